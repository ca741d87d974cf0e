"""Termination signals as interrupts, and cleanup that a second signal cannot cut short.

Python runs no handler on SIGTERM (a SLURM time limit, `timeout`, `docker stop`) or SIGHUP (a
closed terminal): without one, `finally` blocks never run and MLflow runs stay RUNNING. With
`install()`, both raise `Terminated`, a `KeyboardInterrupt`, so they end a run exactly like
Ctrl-C. `shielded()` ignores further signals while a run is being closed.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

HANDLED = ("SIGTERM", "SIGHUP")
SHIELDED = ("SIGINT", "SIGTERM", "SIGHUP")


class Terminated(KeyboardInterrupt):
    """The process was asked to stop by a signal; `signal_name` says which."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(f"received {signal_name}")
        self.signal_name = signal_name


def _raise_terminated(number: int, _frame: object) -> None:
    raise Terminated(signal.Signals(number).name)


def _signals(names: tuple[str, ...]) -> list[signal.Signals]:
    return [getattr(signal, name) for name in names if hasattr(signal, name)]


def install() -> None:
    """SIGTERM and SIGHUP raise `Terminated` in the main thread (elsewhere: nothing to do)."""
    with contextlib.suppress(ValueError):  # not the main thread
        for number in _signals(HANDLED):
            signal.signal(number, _raise_terminated)


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
    if received:
        name = signal.Signals(received[0]).name
        raise KeyboardInterrupt() if name == "SIGINT" else Terminated(name)


def exit_code(error: KeyboardInterrupt) -> int:
    """The shell's exit code for an interrupt: 128 + the signal number (130 for Ctrl-C)."""
    name = error.signal_name if isinstance(error, Terminated) else "SIGINT"
    return 128 + int(getattr(signal, name, signal.SIGINT))
