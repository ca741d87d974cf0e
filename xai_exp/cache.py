"""Content-addressed on-disk cache of explanations (numpy arrays + JSON metadata, no pickle)."""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xai_exp.files import atomic_path

log = logging.getLogger(__name__)

_META = "__meta__"
_CHECKSUM = "__checksum__"


def default_cache_dir() -> Path:
    """The user's cache directory for xai-exp (e.g. ~/.cache/xai-exp)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("xai-exp"))


def cache_key(**parts: Any) -> str:
    """Stable key of everything that determines an explanation (canonical JSON, sha256)."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


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
    """Stores explanations by key; damaged entries are discarded, writes are atomic."""

    def __init__(self, directory: str | Path | None = None, enabled: bool = True) -> None:
        self.enabled = enabled
        self.directory = Path(directory).expanduser() if directory else default_cache_dir()
        self.hits = 0
        self.misses = 0
        self.discarded = 0

    def _path(self, kind: str, key: str) -> Path:
        return self.directory / kind / key[:2] / f"{key}.npz"

    def load(self, kind: str, key: str) -> CacheEntry | None:
        """The entry stored under `key`, or None when absent, disabled or damaged."""
        if not self.enabled:
            return None
        path = self._path(kind, key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
            meta_text = arrays.pop(_META).tobytes().decode()
            stored = arrays.pop(_CHECKSUM).tobytes().decode()
            if stored != _checksum(arrays, meta_text):
                raise ValueError("checksum mismatch")
            entry = CacheEntry(arrays=arrays, meta=json.loads(meta_text))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as error:
            log.warning("discarding damaged cache entry %s (%s); recomputing", path.name, error)
            path.unlink(missing_ok=True)
            self.discarded += 1
            self.misses += 1
            return None
        self.hits += 1
        return entry

    def store(self, kind: str, key: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Write an entry atomically (temp file in the same folder, then rename)."""
        if not self.enabled:
            return
        path = self._path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta_text = json.dumps(meta, sort_keys=True)
        payload = {
            **arrays,
            _META: np.frombuffer(meta_text.encode(), dtype=np.uint8),
            _CHECKSUM: np.frombuffer(_checksum(arrays, meta_text).encode(), dtype=np.uint8),
        }
        with atomic_path(path, suffix=".npz") as temp:
            save: Any = np.savez  # numpy's stub reads the arrays as its keyword arguments
            save(temp, **payload)
