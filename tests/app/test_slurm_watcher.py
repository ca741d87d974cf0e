"""SLURM job states and a requeued job's exit, without a cluster (tests/app/test_slurm.py has one).

submitit's own watcher and signal handler are used; only squeue's output and the clock are
given by the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import REPO_ROOT

pytest.importorskip("submitit")


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_job_that_shows_failed_for_a_moment_is_waited_for_and_a_real_failure_is_reported(
    monkeypatch,
):
    from submitit.slurm.slurm import SlurmInfoWatcher

    from xai_exp.app import slurm

    clock = Clock()
    monkeypatch.setattr(slurm.time, "monotonic", clock)
    watcher = SlurmInfoWatcher()
    slurm._squeue_watcher(watcher)
    watcher.register_job("12_0")
    watcher.register_job("12_1")

    def seen(text: str) -> dict[str, bool]:
        watcher._info_dict.update(watcher.read_info(text))
        return {job: watcher.is_done(job, mode="cache") for job in ("12_0", "12_1")}

    # 12_1 shows FAILED while it is requeued, then PENDING: it was never done
    assert seen("12_0|RUNNING|vm\n12_1|FAILED|vm\n") == {"12_0": False, "12_1": False}
    clock.now += 5
    assert seen("12_0|RUNNING|vm\n12_1|PENDING|\n") == {"12_0": False, "12_1": False}
    # a failure that stays: done once it held for SETTLE_S, not before
    clock.now += 5
    assert seen("12_0|RUNNING|vm\n12_1|FAILED|vm\n")["12_1"] is False
    clock.now += slurm.SETTLE_S - 1
    assert seen("12_0|RUNNING|vm\n12_1|FAILED|vm\n")["12_1"] is False
    clock.now += 1
    assert seen("12_0|COMPLETED|vm\n12_1|FAILED|vm\n") == {"12_0": False, "12_1": True}
    assert watcher.get_state("12_1", mode="cache") == "FAILED"
    # a job squeue stopped listing (older than MinJobAge) is ended at once
    assert seen("12_1|FAILED|vm\n")["12_0"] is True


def test_a_requeued_job_exits_at_once_though_a_thread_would_hold_its_teardown(tmp_path):
    """After submitit requeued the job, the process ends at once: a teardown that waits (here
    a non-daemon thread) would keep the node busy until SLURM kills the job."""
    script = textwrap.dedent(
        """
        import os, signal, threading, time
        os.environ.update(SUBMITIT_FOLDER="/nowhere", SLURM_JOB_ID="7")

        def submitit_requeue(number, frame):  # submitit's USR2 handler after a requeue
            print("requeued", flush=True)
            raise SystemExit(-1)

        signal.signal(signal.SIGUSR2, submitit_requeue)
        from xai_exp.app import signals, slurm

        slurm.take_over_signals()
        threading.Thread(target=time.sleep, args=(120,)).start()  # not a daemon
        signals._ignored("SIGUSR2")  # the preemption signal arrived
        slurm.end_of_job(signals.Terminated("SIGUSR2"))
        print("not reached", flush=True)
        """
    )
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=100,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert time.monotonic() - start < 60, done.stderr
    assert done.stdout.splitlines() == ["requeued"], done.stderr
    assert done.returncode == 255  # submitit's sys.exit(-1)
