"""LIME's superpixels (lime's SegmentationAlgorithm over scikit-image), with no torch import.

Worker processes compute them ahead of the explained image (`SuperpixelWorkers`): each worker
imports only numpy, scikit-image and lime's segmentation wrapper.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from xai_exp.config import ConfigError

log = logging.getLogger(__name__)


# The numbers each algorithm needs to segment anything; outside them every image fails.
LIMITS: dict[str, dict[str, str]] = {
    "quickshift": {"kernel_size": "> 0", "max_dist": "> 0", "ratio": "in [0, 1]", "sigma": ">= 0"},
    "slic": {
        "n_segments": ">= 1",
        "compactness": "> 0",
        "max_num_iter": ">= 1",
        "sigma": ">= 0",
        "min_size_factor": ">= 0",
        "max_size_factor": "> 0",
        "start_label": "in [0, 1]",
    },
    "felzenszwalb": {"scale": "> 0", "sigma": ">= 0", "min_size": ">= 0"},
}
_HOLDS = {
    "> 0": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    "in [0, 1]": lambda v: 0 <= v <= 1,
}


def check_segmentation(algorithm: str, params: dict[str, Any]) -> None:
    """ConfigError for a parameter the scikit-image algorithm does not take, not a number, or
    a number outside what it can segment with (`LIMITS`: ``kernel_size=-3``, ``n_segments=0``)."""
    import inspect
    import math

    import skimage.segmentation

    accepted = inspect.signature(getattr(skimage.segmentation, algorithm)).parameters
    limits = LIMITS.get(algorithm, {})
    for name, value in params.items():
        key = f"lime.segmentation.params.{name}"
        if name not in accepted or name == "image":
            options = ", ".join(p for p in accepted if p != "image")
            raise ConfigError(f"{key}: {algorithm} takes no {name!r} (it takes: {options})")
        if value is None or isinstance(value, bool):
            continue
        if not isinstance(value, int | float):
            raise ConfigError(f"{key}={value!r} must be a number")
        rule = limits.get(name)
        if not math.isfinite(value) or (rule is not None and not _HOLDS[rule](value)):
            raise ConfigError(
                f"{key}={value} must be {rule or 'finite'} for {algorithm} "
                "(otherwise it segments no image)"
            )


def segment(image: np.ndarray, algorithm: str, params: dict[str, Any]) -> np.ndarray:
    """Superpixels with lime's SegmentationAlgorithm, relabelled to contiguous ids 0..n-1.

    lime indexes features by superpixel id, so ids must be 0..n-1 (slic starts at 1).
    """
    from lime.wrappers.scikit_image import SegmentationAlgorithm

    segments = SegmentationAlgorithm(algorithm, **params)(image)
    _, contiguous = np.unique(segments, return_inverse=True)
    return contiguous.reshape(segments.shape).astype(np.int32)


def timed_segment(
    image: np.ndarray, algorithm: str, params: dict[str, Any]
) -> tuple[np.ndarray, float]:
    """`segment` and the seconds it took (in the process that ran it)."""
    start = time.perf_counter()
    segments = segment(image, algorithm, params)
    return segments, time.perf_counter() - start


class SuperpixelWorkers:
    """CPU worker processes computing superpixels ahead of the image being explained.

    `submit` queues an image under a key; `take` returns its superpixels and the seconds the
    worker spent, or None when nothing was queued or the pool broke (the caller computes them
    itself; a broken pool is warned about once and not used again).
    """

    def __init__(self, workers: int, algorithm: str, params: dict[str, Any]) -> None:
        # fork (Linux) starts a worker in milliseconds, as torch's DataLoader does; workers
        # only run scikit-image, never torch or CUDA.
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        self.pool: ProcessPoolExecutor | None = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context(method)
        )
        self.algorithm = algorithm
        self.params = dict(params)
        self.pending: dict[str, Future] = {}

    def submit(self, key: str, image: np.ndarray) -> None:
        """Queue an image's superpixels (once per key)."""
        if self.pool is None or key in self.pending:
            return
        try:
            self.pending[key] = self.pool.submit(timed_segment, image, self.algorithm, self.params)
        except (BrokenProcessPool, RuntimeError) as error:
            self._broken(error)

    def take(self, key: str) -> tuple[np.ndarray, float] | None:
        """The queued result (errors of the segmentation itself are raised), or None."""
        future = self.pending.pop(key, None)
        if future is None:
            return None
        try:
            return future.result()
        except BrokenProcessPool as error:
            self._broken(error)
            return None

    def forget(self, key: str) -> None:
        """Drop a queued result nobody will take."""
        future = self.pending.pop(key, None)
        if future is not None:
            future.cancel()

    def _broken(self, error: BaseException) -> None:
        log.warning("superpixel workers stopped (%s); computing superpixels inline", error)
        self.close()

    def close(self) -> None:
        """Stop the workers (queued work is cancelled)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        self.pending.clear()
