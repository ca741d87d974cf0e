"""Content-addressed on-disk cache of explanations (numpy arrays + JSON metadata, no pickle)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xai_exp.errors import describe
from xai_exp.files import atomic_path

log = logging.getLogger(__name__)

_META = "__meta__"
_CHECKSUM = "__checksum__"


CACHE_DIR_TAG = "cache_dir"  # run tag: where its maps are cached (compare reads them back)


def default_cache_dir() -> Path:
    """The user's cache directory for xai-exp (e.g. ~/.cache/xai-exp)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("xai-exp"))


def cache_key(**parts: Any) -> str:
    """Stable key of everything that determines an explanation (canonical JSON, sha256)."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def module_source(module: str) -> bytes:
    """The source of a module, found without importing it (its name when it has no file)."""
    spec = importlib.util.find_spec(module)
    origin = spec.origin if spec is not None else None
    try:
        return Path(origin).read_bytes() if origin else module.encode()
    except OSError:
        return module.encode()


@functools.cache
def module_digest(module: str) -> str:
    """sha256 of a module's source, read once per process."""
    return hashlib.sha256(module_source(module)).hexdigest()


def code_digest(modules: Iterable[str]) -> str:
    """The code that computes an entry, as a key part: the hash of the sources of the modules
    that compute it. Editing one of them gives new keys (the entry is recomputed once);
    editing any other module leaves the entry's key as it was."""
    digest = hashlib.sha256()
    for module in sorted(set(modules)):
        digest.update(f"{module}={module_digest(module)};".encode())
    return digest.hexdigest()[:16]


def _checksum(arrays: dict[str, np.ndarray], meta: str) -> str:
    digest = hashlib.sha256(meta.encode())
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


@dataclass
class CacheEntry:
    """Arrays and metadata of one cached explanation."""

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]


class ExplanationCache:
    """Stores explanations by key; damaged entries are discarded, writes are atomic.

    The cache only ever saves time: an entry it cannot read is a miss, and a write that fails
    (a full disk, a read-only or misplaced folder) is counted in `failed_writes` and warned
    about once per cache; every result is still used.
    """

    def __init__(self, directory: str | Path | None = None, enabled: bool = True) -> None:
        self.enabled = enabled
        self.directory = Path(directory).expanduser() if directory else default_cache_dir()
        self.hits = 0
        self.misses = 0
        self.discarded = 0
        self.failed_writes = 0
        self._warned: set[str] = set()

    def _path(self, kind: str, key: str) -> Path:
        return self.directory / kind / key[:2] / f"{key}.npz"

    def _warn_once(self, topic: str, message: str, *args: object) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            log.warning(message, *args)

    def contains(self, kind: str, key: str) -> bool:
        """Whether an entry is stored under `key` (not read or checked)."""
        return self.enabled and self._path(kind, key).is_file()

    def load(self, kind: str, key: str) -> CacheEntry | None:
        """The entry stored under `key`, or None when absent, disabled, unreadable or damaged."""
        if not self.enabled:
            return None
        path = self._path(kind, key)
        try:
            if not path.is_file():
                self.misses += 1
                return None
            with np.load(path, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
        except PermissionError as error:
            self._warn_once("read", "cannot read cache entries in %s (%s)", self.directory, error)
            self.misses += 1
            return None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as error:
            self.discard(kind, key, describe(error))
            return None
        try:
            meta_text = arrays.pop(_META).tobytes().decode()
            stored = arrays.pop(_CHECKSUM).tobytes().decode()
            if stored != _checksum(arrays, meta_text):
                raise ValueError("checksum mismatch")
            entry = CacheEntry(arrays=arrays, meta=json.loads(meta_text))
        except (ValueError, KeyError, UnicodeDecodeError) as error:
            self.discard(kind, key, describe(error))
            return None
        self.hits += 1
        return entry

    def discard(self, kind: str, key: str, reason: str) -> None:
        """Drop an entry that cannot be used (it is recomputed and stored again)."""
        path = self._path(kind, key)
        log.warning("discarding cache entry %s (%s); recomputing", path.name, reason)
        with contextlib.suppress(OSError):  # a read-only cache: the entry just stays unused
            path.unlink(missing_ok=True)
        self.discarded += 1
        self.misses += 1

    def store(self, kind: str, key: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Write an entry atomically; a failure is a warning, never an error."""
        if not self.enabled:
            return
        meta_text = json.dumps(meta, sort_keys=True)
        payload = {
            **arrays,
            _META: np.frombuffer(meta_text.encode(), dtype=np.uint8),
            _CHECKSUM: np.frombuffer(_checksum(arrays, meta_text).encode(), dtype=np.uint8),
        }
        try:
            with atomic_path(self._path(kind, key), suffix=".npz") as temp:
                save: Any = np.savez  # numpy's stub reads the arrays as its keyword arguments
                save(temp, **payload)
        except OSError as error:
            self.failed_writes += 1
            self._warn_once(
                "write",
                "cannot write to the explanation cache %s (%s): results are used but not "
                "cached; set cache.dir=PATH to a writable folder, or cache=off",
                self.directory,
                describe(error),
            )
