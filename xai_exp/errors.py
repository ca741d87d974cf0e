"""One-line descriptions of errors, for messages, CSV cells and MLflow tags."""

from __future__ import annotations


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of the error's message (at most `limit` characters), or its type name."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


def describe(error: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, e.g. ``ValueError: bad shape``."""
    return f"{type(error).__name__}: {first_line(error, limit)}"[: limit + 40]


class ModelLoadError(RuntimeError):
    """Weights could not be loaded; the message says how to get a working model."""
