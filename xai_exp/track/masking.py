"""Secrets in tracking URIs: what is secret in a string, and masking it wherever text goes.

`mask` is the single answer to "what is secret in this string": the password of any URL's
userinfo (``http://ana:s3cret@host``), the value of any secret-named query parameter
(``?password=``, ``&token=``, ``access_token``, ``api_key``, ``X-Amz-Signature``...; any
case) and every secret `remember` was shown before, also where it appears outside a URL
(Hydra quotes or escapes override values). Everything that prints, logs or stores text uses it:

- `redact_uri` / `scrub` (xai_exp.track.runs) for messages, params, tags and files we write;
- `protect_output` for what other libraries print or log in this process: a log record
  factory masks every record (Hydra's ``#0 : tracking.uri=...`` job lines, tracebacks logged
  with ``exc_info``, its log file) and ``sys.stdout``/``sys.stderr`` mask every write (Hydra's
  "Error executing job with overrides", MLflow's "View run ... at: URL", tracebacks);
- `HydraSecretsCallback` rewrites the YAML files Hydra saves (``.hydra/*.yaml``,
  ``multirun.yaml``) with the secrets masked.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote

MASK = "***"
MIN_LITERAL = 4  # shorter remembered secrets are masked in URLs only (not in every word)

# scheme://user:password@ : the password stops at the userinfo's end
_USERINFO = re.compile(
    r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s:/@?#'\"]*:)(?P<secret>[^\s@/?#'\"]+)@"
)
# ?password=..., &api_key=..., ;token=... : names that are, or end in, a secret's name
_SECRET_NAME = (
    r"(?:[\w.\-]*[_.\-])?"
    r"(?:password|passwd|pwd|pass|secret|token|key|apikey|auth|credentials?|signature|sig)"
)
_QUERY = re.compile(
    rf"(?P<head>[?&;](?i:{_SECRET_NAME})=)(?P<secret>[^&;#\s,'\"\]\[]+)",
)

_known: set[str] = set()
_lock = threading.Lock()


def secrets_in(text: str) -> list[str]:
    """The secrets `text` holds in URL form (userinfo passwords, secret query values)."""
    found = [m.group("secret") for m in _USERINFO.finditer(text)]
    found += [m.group("secret") for m in _QUERY.finditer(text)]
    return [s for s in found if s != MASK]


def remember(*texts: str | None) -> None:
    """Note the secrets of these texts (URIs, overrides) so `mask` hides them anywhere."""
    for text in texts:
        for secret in secrets_in(text or ""):
            with _lock:
                _known.update(s for s in (secret, unquote(secret)) if len(s) >= MIN_LITERAL)


def mask(text: str, known: Iterable[str] = ()) -> str:
    """`text` with every secret masked: URL passwords, secret query values, remembered ones."""
    if not text:
        return text
    masked = _USERINFO.sub(lambda m: m.group("head") + MASK + "@", text)
    masked = _QUERY.sub(lambda m: m.group("head") + MASK, masked)
    with _lock:
        literals = set(_known)
    literals.update(s for s in known if len(s) >= MIN_LITERAL)
    for secret in sorted(literals, key=len, reverse=True):
        masked = masked.replace(secret, MASK)
    return masked


# --------------------------------------------------------------------------- output


class MaskedStream:
    """A text stream whose writes are masked (everything else is the wrapped stream's)."""

    masks_secrets = True

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(mask(text) if isinstance(text, str) else text)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _masked_record(record: logging.LogRecord) -> logging.LogRecord:
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a malformed record: logging reports it itself
        return record
    masked = mask(message)
    if masked != message:
        record.msg, record.args = masked, None
    if record.exc_info and record.exc_info[1] is not None:
        formatted = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        if mask(formatted) != formatted:
            record.exc_text = mask(formatted)  # formatters use the cached text as is
    if record.stack_info:
        record.stack_info = mask(record.stack_info)
    return record


def protect_output() -> None:
    """Mask secrets in every log record and every write to stdout/stderr (idempotent).

    A record factory rather than a filter: Hydra replaces the logging handlers for each job
    (filters on them would go), and records of any logger reach the log file too.
    """
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "masks_secrets", False):

        def masking_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            return _masked_record(factory(*args, **kwargs))

        masking_factory.masks_secrets = True  # type: ignore[attr-defined]
        logging.setLogRecordFactory(masking_factory)
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not getattr(stream, "masks_secrets", False):
            setattr(sys, name, MaskedStream(stream))


def mask_file(path: Path) -> None:
    """Rewrite a text file with its secrets masked (nothing when there are none)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return
    masked = mask(text)
    if masked != text:
        from xai_exp.files import atomic_write_text

        atomic_write_text(path, masked)


# --------------------------------------------------------------------------- Hydra


def mask_hydra_files(config: Any) -> None:
    """Mask the secrets in the YAML files Hydra saved for this job and its sweep."""
    hydra = config.hydra
    folders = []
    output_dir = hydra.runtime.get("output_dir")
    if output_dir and hydra.get("output_subdir") is not None:
        folders.append(Path(output_dir) / hydra.output_subdir)
    if str(hydra.get("mode")) == "RunMode.MULTIRUN":
        folders.append(Path(hydra.sweep.dir))  # multirun.yaml
    for folder in folders:
        if folder.is_dir():
            for path in folder.glob("*.yaml"):
                mask_file(path)


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - Hydra is a dependency
    Callback = object  # type: ignore[assignment,misc]


class HydraSecretsCallback(Callback):
    """Masks secrets in what Hydra saves: ``.hydra/*.yaml`` of each job, ``multirun.yaml``.

    Hydra writes them just before `on_job_start` (and ``multirun.yaml`` after
    `on_multirun_start`), so they are rewritten there, and once more when the sweep ends.
    Hydra's output itself is masked by `protect_output`, installed here too for jobs that run
    in other processes (the joblib launcher).
    """

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        protect_output()
        remember(_uri(config))

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self.on_run_start(config)

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        self.on_run_start(config)
        mask_hydra_files(config)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        mask_hydra_files(config)


def _uri(config: Any) -> str | None:
    try:
        return str(config.tracking.uri)
    except Exception:  # noqa: BLE001 - no tracking group
        return None
