"""Agreement of two masks (IoU), and summaries of per-image values."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks; two empty masks agree fully (1.0)."""
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)


def summarize(values: Iterable[float | None]) -> dict[str, float]:
    """Mean, median, std, count of the finite values; NaN statistics when there are none."""
    finite = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if finite.size == 0:
        return {"mean": math.nan, "median": math.nan, "std": math.nan, "count": 0}
    return {
        "mean": float(finite.mean()),
        "median": float(np.median(finite)),
        "std": float(finite.std(ddof=0)),
        "count": int(finite.size),
    }
