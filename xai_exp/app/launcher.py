"""The joblib launcher (`hydra/launcher=joblib`) with the sweep's interrupts of an in-process one.

Hydra's joblib launcher runs sweep jobs in loky worker processes. Left alone, a signal kills a
worker in the middle of its run (left RUNNING), joblib's `TerminatedWorkerError` or
`BrokenProcessPool` ends the sweep with a traceback and the parent run is closed FINISHED.
Here (`signals.forwarding`, `signals.install_in_worker`) every worker closes its run KILLED,
no job starts after the signal, and the parent raises the signal once the jobs have ended: the
application closes the sweep KILLED and exits 128 + signal with one line, as in-process.
`register()` wraps the plugin's `launch` with this (Hydra takes launchers from its
`hydra_plugins` package alone, so it cannot be a launcher class of its own).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn

from xai_exp.app import signals

LaunchFunction = Callable[[Any, Sequence[Sequence[str]], int], Sequence[JobReturn]]


def worker_pids() -> list[int]:
    """The pids of the loky worker processes that run the sweep's jobs (none known: [])."""
    try:
        from joblib.externals.loky import reusable_executor

        executor = getattr(reusable_executor, "_executor", None)
        return [int(pid) for pid in list(getattr(executor, "_processes", None) or {})]
    except Exception:  # noqa: BLE001 - a signal handler: no pids, the jobs then end unhelped
        return []


class UntilStopped(Sequence[Sequence[str]]):
    """The jobs' overrides, read lazily by joblib: none is handed out once a signal arrived."""

    def __init__(self, jobs: Sequence[Sequence[str]]) -> None:
        self.jobs = list(jobs)

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: Any) -> Any:
        return self.jobs[index]

    def __iter__(self) -> Iterator[Sequence[str]]:
        for job in self.jobs:
            if signals.stop_requested() is not None:
                return
            yield job


def worker_death(error: BaseException) -> str:
    """One line for a worker that died without a signal to the sweep (kill -9, out of memory)."""
    codes = re.search(r"exit codes of the workers are (\{[^}]*\})", str(error))
    how = f"exit code {codes.group(1)}" if codes else type(error).__name__
    return (
        f"a joblib worker process was killed ({how}; out of memory, or kill -9): joblib "
        "stopped the sweep and its other workers, their open runs are closed FAILED"
    )


def is_worker_death(error: BaseException) -> bool:
    """joblib's or loky's error for a worker process that ended while it ran a job."""
    from concurrent.futures.process import BrokenProcessPool

    return isinstance(error, BrokenProcessPool) or type(error).__name__ in {
        "TerminatedWorkerError",
        "BrokenProcessPool",
    }


def launch_interruptibly(
    launch: LaunchFunction,
    launcher: Any,
    job_overrides: Sequence[Sequence[str]],
    initial_job_idx: int,
) -> Sequence[JobReturn]:
    """The plugin's `launch`, stopped by a signal as an in-process sweep is (module doc)."""
    from xai_exp.app.hydra_app import JobError

    os.environ[signals.WORKER_PARENT_ENV] = str(os.getpid())  # the workers inherit it
    try:
        with signals.forwarding(worker_pids):
            results = launch(launcher, UntilStopped(job_overrides), initial_job_idx)
    except KeyboardInterrupt:
        raise
    except Exception as error:
        signals.raise_pending()  # a signal ended the workers: the sweep was interrupted
        if is_worker_death(error):
            raise JobError(f"xai-exp: {worker_death(error)}") from None
        raise
    signals.raise_pending()  # the jobs ended at the signal: now the sweep stops
    for result in results:  # a worker stopped alone (its copy to this process was lost)
        stopped = getattr(result, "_return_value", None)
        if isinstance(stopped, signals.WorkerInterrupted):
            raise signals.interrupt(stopped.signal_name)
    return results


PLUGIN_CLASS = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"


def register() -> None:
    """Make `hydra/launcher=joblib` stop on signals like an in-process sweep: wrap the plugin's
    `launch` (after Hydra's scan of its plugins, which executes their modules afresh)."""
    plugin: Any = Plugins.instance().class_name_to_class.get(PLUGIN_CLASS)
    if plugin is None or getattr(plugin.launch, "interruptible", False):
        return  # not installed, or wrapped already
    launch = plugin.launch

    def interruptible_launch(
        self: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        return launch_interruptibly(launch, self, job_overrides, initial_job_idx)

    interruptible_launch.interruptible = True  # type: ignore[attr-defined]
    plugin.launch = interruptible_launch
