"""Agreement of two masks (IoU, with its chance level and ceiling), and summaries of values.

Raw IoU grows with the masks' areas: two independent random masks covering fractions a and b
of an image already score about ab / (a + b - ab). `chance_corrected` therefore reports, per
pair of masks, the expected IoU of random masks of the same two sizes (`iou_chance`), the
highest IoU the two sizes allow (`iou_ceiling`) and the agreement above chance

    iou_corrected = (IoU - chance) / (ceiling - chance)

the adjustment for chance of Hubert and Arabie's adjusted Rand index applied to IoU: 0 is
what random masks of those sizes score on average (exactly: its expectation under random
placement is 0), 1 is the best any masks of those sizes could do, below 0 is worse than chance.
"""

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


def iou_chance(first: int, second: int, pixels: int) -> float:
    """Expected IoU of two independent, uniformly placed random masks of `first` and `second`
    pixels out of `pixels` (exact: the intersection is hypergeometric)."""
    if not 0 <= first <= pixels or not 0 <= second <= pixels:
        raise ValueError(f"mask sizes {first}, {second} must lie in 0..{pixels}")
    if first + second == 0:
        return 1.0  # two empty masks agree fully, as `iou` says
    if first == 0 or second == 0:
        return 0.0
    from scipy.stats import hypergeom

    overlap = np.arange(max(0, first + second - pixels), min(first, second) + 1)
    chances = hypergeom.pmf(overlap, pixels, first, second)
    return float(np.sum(chances * overlap / (first + second - overlap)))


def iou_ceiling(first: int, second: int) -> float:
    """The highest IoU two masks of these sizes can reach: one inside the other."""
    if first == second:
        return 1.0
    return min(first, second) / max(first, second)


def chance_corrected(a: np.ndarray, b: np.ndarray) -> dict[str, float | None]:
    """IoU of two masks with its chance level, its ceiling and the agreement above chance.

    Keys: ``iou``, ``iou_chance``, ``iou_ceiling``, ``iou_corrected`` (None where the sizes
    leave no room above chance, e.g. a mask covering the whole image).
    """
    found = iou(a, b)
    first, second, pixels = int(a.sum()), int(b.sum()), int(a.size)
    chance = iou_chance(first, second, pixels)
    ceiling = iou_ceiling(first, second)
    room = ceiling - chance
    return {
        "iou": found,
        "iou_chance": chance,
        "iou_ceiling": ceiling,
        "iou_corrected": (found - chance) / room if room > 1e-12 else None,
    }


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
