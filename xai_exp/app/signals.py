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
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

SHIELDED = ("SIGINT", "SIGTERM", "SIGHUP")


class Terminated(KeyboardInterrupt):
    """The process was asked to stop by a signal; `signal_name` says which."""

    def __init__(self, signal_name: str) -> None:
        why = " (SLURM: time limit near, or preemption)" if signal_name == _preempt else ""
        super().__init__(f"received {signal_name}{why}")
        self.signal_name = signal_name


_pending: list[str] = []  # signals received outside an interruptible block, oldest first
_depth = 0  # how many interruptible blocks are open
_preempt: str | None = None  # the preemption signal's name, in a SLURM job (`install`)
preempted = False  # the preemption signal arrived: later SIGTERMs are ignored


def _interrupt(name: str) -> KeyboardInterrupt:
    return KeyboardInterrupt() if name == "SIGINT" else Terminated(name)


def _ignored(name: str) -> bool:
    """Note the preemption signal; True for a SIGTERM after it (SLURM stopping the job)."""
    global preempted
    if name == _preempt:
        preempted = True
        return False
    return preempted and name == "SIGTERM"


def _on_signal(number: int, _frame: object) -> None:
    name = signal.Signals(number).name
    if _ignored(name):
        return
    if _depth > 0 or _pending:  # inside a job, or pressed again: the user insists
        _pending.clear()
        raise _interrupt(name)
    _pending.append(name)


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


def raise_pending() -> None:
    """Raise the first signal that arrived outside an interruptible block, if any."""
    if _pending:
        name = _pending[0]
        _pending.clear()
        raise _interrupt(name)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """A block that signals interrupt at once (after any that arrived before it)."""
    global _depth
    _depth += 1
    try:
        raise_pending()
        yield
    finally:
        _depth -= 1


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
        raise _interrupt(_preempt if _preempt in names else names[0])


def exit_code(error: KeyboardInterrupt) -> int:
    """The shell's exit code for an interrupt: 128 + the signal number (130 for Ctrl-C)."""
    name = error.signal_name if isinstance(error, Terminated) else "SIGINT"
    return 128 + int(getattr(signal, name, signal.SIGINT))
