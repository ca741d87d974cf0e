"""Intervals and paired tests over images, from scipy (no hand-rolled statistics).

Means carry a 95% bootstrap confidence interval (`scipy.stats.bootstrap`, BCa, resampling
images, seeded so a rerun prints the same numbers). Two settings evaluated on the same images
are compared by their paired differences: the mean difference with its bootstrap interval, and
the Wilcoxon signed-rank test (`scipy.stats.wilcoxon`).

Small samples are said to be small: with n images that differ, the exact two-sided Wilcoxon
p-value cannot fall below 2 / 2^n, so below `min_test_images()` (6) no test is run and the
result says "too few images to test (n = 3)"; a bootstrap interval from fewer than
`MIN_INTERVAL_IMAGES` (10) images covers less than it claims (BCa: about 77% at n = 4) and
carries a warning.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000
SEED = 0
BCA_MAX_IMAGES = 5000  # BCa's jackknife is quadratic in n; above this, the percentile interval
BATCH = 100  # resamples held in memory at once
SIGNIFICANCE = 0.05  # the level a paired test must be able to reach to be run at all
MIN_INTERVAL_IMAGES = 10  # below this a 95% interval carries a warning


def smallest_wilcoxon_p(pairs: int) -> float:
    """The smallest two-sided p-value the exact Wilcoxon test can give for `pairs` differences
    (all of one sign): 2 / 2^n."""
    return min(1.0, 2.0 / 2.0**pairs)


def min_test_images(level: float = SIGNIFICANCE) -> int:
    """The fewest differing pairs whose Wilcoxon test can reach p < `level` (6 at 0.05)."""
    pairs = 1
    while smallest_wilcoxon_p(pairs) >= level:
        pairs += 1
    return pairs


def too_few_to_test(pairs: int, level: float = SIGNIFICANCE) -> str | None:
    """ "too few images to test (n = 3)" when no test on `pairs` differences could reach `level`."""
    if smallest_wilcoxon_p(pairs) < level:
        return None
    return f"too few images to test (n = {pairs})"


def interval_warning(images: int) -> str | None:
    """A warning for an interval from fewer than `MIN_INTERVAL_IMAGES` images (None above)."""
    if images >= MIN_INTERVAL_IMAGES:
        return None
    return f"interval from {images} < {MIN_INTERVAL_IMAGES} images: covers less than 95%"


def _finite(values: Iterable[float | None]) -> np.ndarray:
    array = np.array([math.nan if v is None else float(v) for v in values], dtype=float)
    return array[np.isfinite(array)]


def mean_interval(
    values: Iterable[float | None], confidence: float = CONFIDENCE, seed: int = SEED
) -> tuple[float, float]:
    """95% bootstrap confidence interval of the mean of the finite values (BCa, seeded).

    NaN for fewer than two values; a single repeated value is its own interval. The
    percentile interval stands in where BCa is undefined (a very skewed sample) or too costly
    (more than `BCA_MAX_IMAGES` values, where the two agree).
    """
    from scipy import stats

    data = _finite(values)
    if data.size < 2:
        return (math.nan, math.nan)
    if float(np.ptp(data)) == 0.0:
        return (float(data[0]), float(data[0]))
    methods = ("BCa", "percentile") if data.size <= BCA_MAX_IMAGES else ("percentile",)
    for method in methods:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns where BCa degenerates; we fall back
            found = stats.bootstrap(
                (data,),
                np.mean,
                confidence_level=confidence,
                n_resamples=RESAMPLES,
                method=method,
                batch=BATCH,
                rng=np.random.default_rng(seed),
            ).confidence_interval
        if math.isfinite(found.low) and math.isfinite(found.high):
            return (float(found.low), float(found.high))
    return (math.nan, math.nan)


@dataclass(frozen=True)
class PairedDifference:
    """Setting a minus setting b on the images both have a value for."""

    images: int
    mean_a: float
    mean_b: float
    mean_difference: float
    ci_low: float
    ci_high: float
    wilcoxon_p: float  # two-sided; 1.0 when every difference is zero; NaN when too few
    note: str = ""  # "too few images to test (n = 3)", or the small-sample interval warning


def paired_difference(a: Iterable[float | None], b: Iterable[float | None]) -> PairedDifference:
    """Mean paired difference a - b with its bootstrap interval and Wilcoxon's p-value.

    Pairs where either value is missing are dropped. NaN statistics for no pair. With fewer
    differing pairs than a test needs to reach p < 0.05 the p-value is NaN and `note` says
    "too few images to test (n = ...)"; an interval from fewer than 10 pairs carries a note.
    """
    from scipy import stats

    pairs = np.array(
        [
            (float(x), float(y))
            for x, y in zip(a, b, strict=True)
            if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
        ],
        dtype=float,
    ).reshape(-1, 2)
    if len(pairs) == 0:
        return PairedDifference(0, *(math.nan,) * 6)
    differences = pairs[:, 0] - pairs[:, 1]
    low, high = mean_interval(differences)
    differing = int(np.count_nonzero(differences))
    refused = too_few_to_test(differing)
    if differing == 0:
        p_value = 1.0
    elif refused is not None:
        p_value = math.nan
    else:
        p_value = float(stats.wilcoxon(differences, zero_method="wilcox").pvalue)
    notes = [n for n in (refused if differing else None, interval_warning(len(pairs))) if n]
    return PairedDifference(
        images=len(pairs),
        mean_a=float(pairs[:, 0].mean()),
        mean_b=float(pairs[:, 1].mean()),
        mean_difference=float(differences.mean()),
        ci_low=low,
        ci_high=high,
        wilcoxon_p=p_value,
        note="; ".join(notes),
    )
