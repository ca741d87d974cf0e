"""How many threads the forward passes get: the CPUs this process may use, not the machine's.

torch and ONNX Runtime default to one thread per core of the machine. A job that may use fewer
(a CPU affinity mask, a cgroup CPU quota, a SLURM allocation, OMP_NUM_THREADS) then runs more
threads than it has CPUs; their synchronised parallel loops wait on threads that are not
running, and one forward pass can take 100x longer. `cpu_share` finds the smallest of those
limits, `inference_threads` adds the `inference.threads` override, and `apply_torch_threads`
sets torch's count once torch is loaded (this module never imports torch: a fully cached
rerun never loads it).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
OVERRIDE = "inference.threads"


@dataclass(frozen=True)
class ThreadCount:
    """A thread count and what set it (the limit that was smallest, or the override)."""

    threads: int
    source: str

    def describe(self) -> str:
        """``1 (CPU share: affinity)``: for the log line."""
        if self.source == OVERRIDE:
            return f"{self.threads} ({OVERRIDE})"
        return f"{self.threads} (CPU share: {self.source})"


def _positive_int(text: str | None) -> int | None:
    """`text` as an integer >= 1; None when it is absent or not one."""
    try:
        value = int(str(text).strip())
    except ValueError:
        return None
    return value if value >= 1 else None


def _whole_cpus(quota: float, period: float) -> int | None:
    """A CFS quota as whole CPUs, rounded down (at least 1); None when there is no limit.

    Down, not up: with 1.5 CPUs, two threads exhaust the quota in 75 ms of each 100 ms period
    and are both stopped for the rest, stalling every parallel loop; one thread loses at most
    the half CPU.
    """
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.floor(quota / period))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _folder_quota(folder: Path) -> int | None:
    """The quota one cgroup folder sets (v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us`` and
    ``cpu.cfs_period_us``, quota -1: none), in whole CPUs."""
    v2 = _read(folder / "cpu.max")
    if v2 is not None:
        parts = v2.split()
        numbers = parts if len(parts) == 2 and parts[0] != "max" else None
    else:
        quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
        numbers = [quota, period] if quota is not None and period is not None else None
    if numbers is None:
        return None
    try:
        return _whole_cpus(float(numbers[0]), float(numbers[1]))
    except ValueError:
        return None


def _own_cgroup_folders(root: Path, proc_cgroup: Path) -> list[Path]:
    """The folders under `root` of this process's cgroup (from `proc_cgroup`, v2 ``0::/path``
    or v1 ``N:cpu,cpuacct:/path``) and of each cgroup above it: a parent's quota binds too.
    In a container `root` is usually the process's own cgroup already (path ``/``)."""
    folders = [root, root / "cpu", root / "cpu,cpuacct"]
    for line in (_read(proc_cgroup) or "").splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        parts = Path(path.strip()).parts[1:]  # without the leading "/"
        if ".." in parts:  # a cgroup outside this namespace's view: not under `root`
            continue
        if controllers == "":
            base = root
        elif "cpu" in controllers.split(","):
            base = root / controllers
        else:
            continue
        folders += [base.joinpath(*parts[:depth]) for depth in range(len(parts), 0, -1)]
    return folders


def cgroup_cpus(root: Path | None = None, proc_cgroup: Path = PROC_CGROUP) -> int | None:
    """The CPU quota of this process's cgroup in whole CPUs: the smallest that the cgroup
    filesystem at `root` (None: `CGROUP_ROOT`) sets for it or a cgroup above it; None when
    none is set or readable."""
    root = CGROUP_ROOT if root is None else root
    quotas = [_folder_quota(folder) for folder in _own_cgroup_folders(root, proc_cgroup)]
    return min((quota for quota in quotas if quota is not None), default=None)


def affinity_cpus() -> int:
    """The CPUs the scheduler lets this process run on (all of them where it cannot say)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        return os.cpu_count() or 1


def cpu_share(
    cgroup_root: Path | None = None, environ: Mapping[str, str] | None = None
) -> ThreadCount:
    """The CPUs this process may use: the smallest of its affinity, its cgroup's CPU quota,
    SLURM_CPUS_PER_TASK and OMP_NUM_THREADS (invalid values are ignored); at least 1."""
    environ = os.environ if environ is None else environ
    limits = [
        (affinity_cpus(), "affinity"),
        (cgroup_cpus(cgroup_root), "cgroup quota"),
        (_positive_int(environ.get("SLURM_CPUS_PER_TASK")), "SLURM_CPUS_PER_TASK"),
        (_positive_int(environ.get("OMP_NUM_THREADS")), "OMP_NUM_THREADS"),
    ]
    found = [(count, source) for count, source in limits if count is not None]
    count, source = min(found, key=lambda limit: limit[0])  # the first of equal limits
    return ThreadCount(max(1, count), source)


def inference_threads(
    setting: int | None = None,
    cgroup_root: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> ThreadCount:
    """`inference.threads` as it applies: the setting, or the CPU share when it is null."""
    if setting is not None:
        return ThreadCount(setting, OVERRIDE)
    return cpu_share(cgroup_root, environ)


_configured: ThreadCount | None = None


def configure_threads(setting: int | None) -> ThreadCount:
    """Use `setting` (null: the CPU share) for this process's forward passes from now on.

    Logs one line; sets torch's count now only when torch is already loaded (otherwise
    `apply_torch_threads` does where it is).
    """
    global _configured
    _configured = count = inference_threads(setting)
    log.info("inference threads: %s", count.describe())
    if "torch" in sys.modules:
        apply_torch_threads()
    return count


def threads_in_use() -> ThreadCount:
    """The configured count, or the CPU share when `configure_threads` was not called."""
    return _configured if _configured is not None else cpu_share()


def apply_torch_threads() -> int:
    """Set torch's intra-op threads (and, while it still can, inter-op threads) to the count
    in use; returns it. Call it where torch is loaded."""
    import torch  # the caller has loaded it

    threads = threads_in_use().threads
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    try:
        if torch.get_num_interop_threads() > threads:
            torch.set_num_interop_threads(threads)
    except RuntimeError:  # only before the first inter-op parallel work; intra-op is what counts
        pass
    return threads
