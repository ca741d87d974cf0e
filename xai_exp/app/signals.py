"""Termination signals as interrupts, and cleanup that a second signal cannot cut short.

Python runs no handler on SIGTERM (a SLURM time limit, `timeout`, `docker stop`) or SIGHUP (a
closed terminal): without one, `finally` blocks never run and MLflow runs stay RUNNING. With
`install()`, both raise `Terminated`, a `KeyboardInterrupt`, so they end a run exactly like
Ctrl-C. They are raised only inside `interruptible()` blocks (a study's own code); one that
arrives elsewhere (Hydra's code between two sweep jobs, which may turn an exception raised in
the middle of it into an error of its own) waits for the next block, or for `raise_pending()`;
a second one there raises at once.
`deferred()` holds signals while a run is created or closed and raises them after;
`shielded()` ignores them while a sweep's parent run is closed, the last thing a sweep does.

In a SLURM job (`xai_exp.app.slurm`) `install(preempt="SIGUSR2")` adds submitit's time-limit and
preemption signal: it interrupts the study like SIGTERM (the run closes KILLED with what
finished) and, once it arrived, a SIGTERM is SLURM ending the job it requeues: ignored.

A sweep whose jobs run in worker processes (the joblib launcher) stops as one: the parent
passes its signal on to the workers (`forwarding()`), a worker passes its own to the parent
(`install_in_worker()`), each worker closes its run KILLED and refuses every later job, and
the parent raises the signal once the jobs have ended. Repeated presses and the copies that
went around wait for that, `GRACE_S` seconds at most; one after that raises at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator

SHIELDED = ("SIGINT", "SIGTERM", "SIGHUP")
WORKER_PARENT_ENV = "XAI_EXP_SWEEP_PARENT"  # the pid of the sweep whose worker a process is
GRACE_S = 15.0  # how long a sweep's workers may take to close their runs before a press kills


class Terminated(KeyboardInterrupt):
    """The process was asked to stop by a signal; `signal_name` says which."""

    def __init__(self, signal_name: str) -> None:
        why = " (SLURM: time limit near, or preemption)" if signal_name == _preempt else ""
        super().__init__(f"received {signal_name}{why}")
        self.signal_name = signal_name


class WorkerInterrupted(Exception):  # noqa: N818 - it reports an interrupt, it is no error
    """A sweep job in a worker process ended by a signal (its run closed KILLED); an ordinary
    exception, so the worker survives it and the parent raises the signal itself."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(f"received {signal_name}")
        self.signal_name = signal_name

    def __reduce__(self) -> tuple[type, tuple[str]]:  # back to the parent intact
        return (WorkerInterrupted, (self.signal_name,))


_pending: list[str] = []  # signals received outside an interruptible block, oldest first
_raised: list[str] = []  # signals raised inside the open interruptible block
_depth = 0  # how many interruptible blocks are open
_preempt: str | None = None  # the preemption signal's name, in a SLURM job (`install`)
preempted = False  # the preemption signal arrived: later SIGTERMs are ignored
_workers: Callable[[], Iterable[int]] | None = None  # the parent, while workers run its jobs
_stopping_since: float | None = None  # the parent: when a sweep's workers were told to stop
_worker_of: int | None = None  # a worker process: its sweep's pid
_stopped: str | None = None  # a worker process: the signal that stopped it (sticky)


def interrupt(name: str) -> KeyboardInterrupt:
    """The interrupt a signal raises: KeyboardInterrupt for SIGINT, else `Terminated`."""
    return KeyboardInterrupt() if name == "SIGINT" else Terminated(name)


def _ignored(name: str) -> bool:
    """Note the preemption signal; True for a SIGTERM after it (SLURM stopping the job)."""
    global preempted
    if name == _preempt:
        preempted = True
        return False
    return preempted and name == "SIGTERM"


def _on_signal(number: int, _frame: object) -> None:
    global _stopping_since
    name = signal.Signals(number).name
    if _ignored(name):
        return
    if in_worker():
        _stop_worker(number)
        return
    if _depth > 0:  # inside a job of this process: at once
        _pending.clear()
        _raised.append(name)  # `check` raises it again if it landed where Python ignores it
        raise interrupt(name)
    if _stopping_since is not None:  # the workers close their runs: repeats and copies wait
        if time.monotonic() - _stopping_since < GRACE_S:
            return
        _pending.clear()  # the user insists: the workers are killed, their runs closed after
        raise interrupt(name)
    if _workers is not None:  # the first: the workers stop too, the sweep once they have
        _stopping_since = time.monotonic()
        _pending[:] = [name]
        _send(_workers(), number)
        return
    if _pending:  # pressed again: the user insists
        _pending.clear()
        raise interrupt(name)
    _pending.append(name)


def _send(pids: Iterable[int], number: int) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):  # gone already
            os.kill(pid, number)


def _stop_worker(number: int) -> None:
    """A worker's signal: the first stops its job at once (and every later one) and the
    whole sweep; repeats and the parent's copy change nothing."""
    global _stopped
    if _stopped is not None:
        return
    name = signal.Signals(number).name
    _stopped = name
    if _worker_of is not None:
        _send([_worker_of], number)
    if _depth > 0:
        raise interrupt(name)


def _signals(names: tuple[str, ...]) -> list[signal.Signals]:
    names = (*names, _preempt) if _preempt else names
    return [getattr(signal, name) for name in names if hasattr(signal, name)]


def install(preempt: str | None = None) -> None:
    """SIGINT, SIGTERM and SIGHUP interrupt `interruptible()` blocks in the main thread (a
    SIGINT the parent process ignores stays ignored); `preempt` (``"SIGUSR2"`` in a SLURM
    job) too, after which SIGTERM is ignored."""
    global _preempt
    _preempt = preempt or _preempt
    with contextlib.suppress(ValueError):  # not the main thread
        for number in _signals(SHIELDED):
            if number == signal.SIGINT and signal.getsignal(number) == signal.SIG_IGN:
                continue
            signal.signal(number, _on_signal)


def install_in_worker() -> None:
    """In a worker process of a sweep (`WORKER_PARENT_ENV` names its parent): SIGINT, SIGTERM
    and SIGHUP stop the job in progress (its run closed KILLED) and every later one, and reach
    the parent, which stops the whole sweep. Elsewhere nothing changes."""
    global _worker_of
    parent = os.environ.get(WORKER_PARENT_ENV, "")
    if _worker_of is not None or not parent.isdigit() or int(parent) != os.getppid():
        return  # installed already, or not a worker (the joblib launcher with n_jobs=1)
    _worker_of = int(parent)
    install()


def in_worker() -> bool:
    """Whether this process is a sweep's worker (`install_in_worker`; not a process it forked,
    such as a superpixel worker, which keeps the ordinary handling)."""
    return _worker_of is not None and os.getppid() == _worker_of


@contextlib.contextmanager
def forwarding(workers: Callable[[], Iterable[int]]) -> Iterator[None]:
    """The block runs sweep jobs in worker processes, whose pids `workers` gives: the first
    signal is passed on to them and waits (`stop_requested`, `raise_pending`) while they
    close their runs; another one raises only `GRACE_S` seconds later (it kills them)."""
    global _workers
    raise_pending()  # one that arrived before: nothing has started
    _workers = workers
    try:
        yield
    finally:
        _workers = None


def stop_requested() -> str | None:
    """The signal that stops this sweep or worker, once one arrived; else None."""
    return _stopped or (_pending[0] if _pending else None)


def raise_pending() -> None:
    """Raise the first signal that arrived outside an interruptible block, if any."""
    if _pending:
        name = _pending[0]
        _pending.clear()
        raise interrupt(name)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """A block that signals interrupt at once (after any that arrived before it)."""
    global _depth
    _depth += 1
    try:
        raise_pending()
        if _stopped is not None:  # a worker that a signal stopped runs no further job
            raise interrupt(_stopped)
        yield
    finally:
        _depth -= 1
        _raised.clear()


def check() -> None:
    """Raise again an interrupt that a signal raised inside the block but that never reached
    it: one raised while Python ran a finaliser or a weakref callback is printed and ignored
    ("Exception ignored in ..."). Call it between units of work (the job does, per image)."""
    if _raised:
        raise interrupt(_raised[-1])


def prevailing(error: BaseException) -> BaseException:
    """What ends a job that failed with `error`: an interrupt raised inside the block whose
    place an exception took (Python ignored it in a finaliser and the code it cut short failed
    later, or a library turned it into an error of its own) wins, so the job stops as
    interrupted rather than as failed."""
    if _raised and not isinstance(error, KeyboardInterrupt):
        return interrupt(_raised[-1])
    return error


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Ignore SIGINT, SIGTERM and SIGHUP for the block (cleanup that must finish)."""
    saved = {}
    with contextlib.suppress(ValueError):  # not the main thread: nothing can interrupt it
        for number in _signals(SHIELDED):
            saved[number] = signal.signal(number, signal.SIG_IGN)
    try:
        yield
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP until the block ends, then raise as they would have.

    For steps that must not be cut in half (creating an MLflow run and recording that it
    exists): an interrupt during the block takes effect right after it, when the caller can
    close what the block opened.
    """
    received: list[int] = []
    saved = {}
    with contextlib.suppress(ValueError):  # not the main thread
        for number in _signals(SHIELDED):
            saved[number] = signal.signal(number, lambda n, _f: received.append(n))
    try:
        yield
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)
    names = [signal.Signals(number).name for number in received]
    names = [name for name in names if not _ignored(name)]
    if names:
        if in_worker():
            if _stopped is not None:
                return  # a worker stops once: its job is ending already
            _stop_worker(int(getattr(signal, names[0])))
        raise interrupt(_preempt if _preempt in names else names[0])


def exit_code(error: KeyboardInterrupt) -> int:
    """The shell's exit code for an interrupt: 128 + the signal number (130 for Ctrl-C)."""
    name = error.signal_name if isinstance(error, Terminated) else "SIGINT"
    return 128 + int(getattr(signal, name, signal.SIGINT))
