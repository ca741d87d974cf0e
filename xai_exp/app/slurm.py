"""SLURM sweeps (hydra/launcher=slurm, hydra-submitit-launcher): the console and the signals.

Where the sweep is submitted (`SlurmConsole`, a Hydra callback): submitit reads job states
with `sacct`; a cluster without accounting makes every poll print the same warnings three
times. There, states are read with `squeue` instead and one line says so.

A job that fails does not end the sweep while others run (`wait_for_every_job`): Hydra's
launcher raises the first failure it reads, so a job requeued after a preemption would finish
with no one waiting for it; the sweep now waits for every job, then reports the failure.

In a job (`take_over_signals`, `end_of_job`): submitit ignores SIGTERM and turns USR2 (sent
`signal_delay_s` before the time limit, or by `scancel --signal=USR2`) into a requeue that
exits at once, in the middle of the study. Here both stop the study as an interrupt, so the
run closes KILLED with the images finished so far; then submitit's own USR2 handler decides:
requeue (the job reruns and the cache returns every finished image) or not (the job fails
with one line). A SIGTERM without USR2 (the time limit itself, `scancel --signal=TERM`) ends
the job with one line; one after USR2 is SLURM ending the job it requeued, and is ignored.
"""

from __future__ import annotations

import getpass
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from xai_exp.app import signals
from xai_exp.app.cli import exit_now

log = logging.getLogger("xai_exp")

_submitit_handler: Callable[[int, Any], Any] | None = None  # its USR2 handler in a job


def preempt_signal() -> str:
    """submitit's time-limit and preemption signal (``SUBMITIT_PREEMPT_SIGNAL``, USR2)."""
    return "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")


def in_job() -> bool:
    """True in the process of a submitit SLURM job."""
    return bool(os.environ.get("SUBMITIT_FOLDER")) and bool(os.environ.get("SLURM_JOB_ID"))


def job_id() -> str | None:
    """This job's id as squeue shows it (``12_3`` for task 3 of array 12), None outside one."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def take_over_signals() -> None:
    """In a SLURM job: SIGINT, SIGTERM, SIGHUP and USR2 interrupt the study; submitit's USR2
    handler (checkpoint and requeue) is kept for `end_of_job`."""
    global _submitit_handler
    if not in_job():
        return
    name = preempt_signal()
    number = getattr(signal, name, None)
    if number is None:
        return
    current = signal.getsignal(number)
    if callable(current) and _submitit_handler is None:
        _submitit_handler = current
    signals.install(preempt=name)


def end_of_job(error: KeyboardInterrupt) -> str:
    """After the study's run closed on an interrupt, in a SLURM job: let submitit requeue the
    job (it exits at once, SystemExit), else return the job's one line of failure."""
    reason = error.signal_name if isinstance(error, signals.Terminated) else "SIGINT"
    where = f"SLURM job {job_id()}"
    if signals.preempted and _submitit_handler is not None:
        try:
            _submitit_handler(getattr(signal, preempt_signal()), None)  # requeue: SystemExit
        except SystemExit as requeued:
            # SLURM reruns the job: its run is closed and its images cached, and a teardown
            # that stalls (a thread or pool joined at exit) would hold the node until SLURM
            # kills the job `KillWait` seconds later, in the middle of its requeue
            exit_now(requeued.code if isinstance(requeued.code, int) else 1)
        except Exception as refused:  # noqa: BLE001 - submitit's UncompletedJobError
            text = str(refused).removeprefix("Job not requeued because: ").rstrip(".")
            return (
                f"{where} stopped by {reason} and not requeued ({text}); the run is KILLED with "
                "the images finished so far; run the sweep again (same cache.dir) to resume, or "
                "raise hydra.launcher.max_num_timeout / timeout_min"
            )
    return (
        f"{where} stopped by {reason} (time limit, scancel or preemption); the run is KILLED "
        "with the images finished so far; run the sweep again (same cache.dir) to resume"
    )


# --------------------------------------------------------------------------- the console


def accounting_problem() -> str | None:
    """Why `sacct` cannot report job states (its own line), or None when it can."""
    try:
        done = subprocess.run(
            ["sacct", "-n", "-X", "-o", "JobID", "-S", "now"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as error:
        return str(error)
    if done.returncode == 0:
        return None
    return (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]


class _OneSacctWarning(logging.Filter):
    """submitit's "Bypassing sacct error" warning once, as one line; later ones dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.shown = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "Bypassing sacct error" not in record.getMessage():
            return True
        if self.shown:
            return False
        self.shown = True
        record.msg, record.args = "job states could not be read (squeue or sacct failed)", ()
        return True


SETTLE_S = 30.0  # how long a job must stay in an ended state before it counts as ended
_ENDED = ("BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
          "OUT_OF_MEMORY", "TIMEOUT")  # fmt: skip


def _squeue_watcher(watcher: Any) -> None:
    """Make submitit's SLURM watcher read job states with `squeue` (no accounting needed).

    A job squeue no longer lists (ended more than MinJobAge ago) counts as ended: its result
    file says how, and a job that left none is reported failed instead of waited for forever.
    A listed job in an ended state counts as ended only once it stayed so for `SETTLE_S`
    seconds: a job being requeued can show one for a moment (a job that finished is seen by
    its result file at once, so only a failure is reported later).
    """
    ended_since: dict[str, float] = {}

    def command() -> list[str] | None:
        if not watcher._registered - watcher._finished:
            return None
        user = getpass.getuser()
        # every state: a job being requeued (REQUEUED, REQUEUE_HOLD) is not listed by default
        return ["squeue", "--noheader", "--array", "--states=all", "-u", user, "-o", "%i|%T|%N"]

    def read_info(output: bytes | str) -> dict[str, dict[str, str]]:
        text = output.decode() if isinstance(output, bytes) else output
        info: dict[str, dict[str, str]] = {}
        for line in text.splitlines():
            job, state, nodes = ([*line.strip().split("|"), "", ""])[:3]
            if job:
                state = "REQUEUED" if state.startswith("REQUEUE") else state  # not done yet
                info[job] = {"JobID": job, "State": _settled(job, state), "NodeList": nodes}
        for job in watcher._registered - watcher._finished:
            info.setdefault(job, {"JobID": job, "State": "ENDED", "NodeList": ""})
        return info

    def _settled(job: str, state: str) -> str:
        if state not in _ENDED:
            ended_since.pop(job, None)
            return state
        since = ended_since.setdefault(job, time.monotonic())
        return state if time.monotonic() - since >= SETTLE_S else "COMPLETING"

    watcher._make_command = command
    watcher.read_info = read_info


def quiet_submitit() -> None:
    """Without SLURM accounting: job states from squeue, one line instead of warnings."""
    problem = accounting_problem()
    submitit_log = logging.getLogger("submitit")
    if not any(isinstance(f, _OneSacctWarning) for f in submitit_log.filters):
        submitit_log.addFilter(_OneSacctWarning())
    if problem is None:
        return
    from submitit.slurm.slurm import SlurmJob

    _squeue_watcher(SlurmJob.watcher)
    log.info("SLURM accounting is off (sacct: %s): job states are read with squeue", problem)


POLL_S = 2.0  # how often the sweep asks SLURM whether its remaining jobs have ended


def _wait_for_registered_jobs() -> None:
    """Until every SLURM job this process submitted has ended (requeued ones included)."""
    from submitit.slurm.slurm import SlurmJob

    watcher = SlurmJob.watcher
    while True:
        waiting = watcher._registered - watcher._finished
        if all(watcher.is_done(job, mode="standard") for job in waiting):
            return
        time.sleep(POLL_S)


def wait_for_every_job() -> None:
    """Make the SLURM launcher wait for all of a sweep's jobs before it reports a failed one."""
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

    launch = BaseSubmititLauncher.launch
    if getattr(launch, "waits_for_every_job", False):
        return

    def launch_and_wait(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return launch(self, *args, **kwargs)
        except Exception:
            _wait_for_registered_jobs()  # a requeued job finishes under the sweep
            raise

    launch_and_wait.waits_for_every_job = True  # type: ignore[attr-defined]
    BaseSubmititLauncher.launch = launch_and_wait


def is_slurm_launcher(config: DictConfig) -> bool:
    """True when the sweep's jobs go to SLURM (hydra/launcher=slurm or submitit_slurm)."""
    target = str(config.hydra.launcher.get("_target_", ""))
    return target.endswith("SlurmLauncher")


class SlurmConsole(Callback):
    """Hydra callback: a SLURM sweep's console without submitit's repeated sacct warnings."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if is_slurm_launcher(config):
            quiet_submitit()
            wait_for_every_job()
