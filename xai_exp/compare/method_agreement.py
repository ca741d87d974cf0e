"""Method x method agreement on shared images, read from the explanation cache.

A sweep over methods explains the same images with each CAM method and with LIME. Their maps
are in the cache already, so every pair is compared without recomputing anything: the mean IoU
of the two maps' top-f masks (f: the runs' `cam_top_fraction`, `masks.cam_top_fraction_mask` for
both, LIME as its per-pixel weight map) and the mean Spearman rank correlation of the maps.
No MLflow here: `compare` finds the runs, their cache folder and their keys.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from xai_exp.cache import ExplanationCache
from xai_exp.evaluate.agreement import rank_correlation
from xai_exp.evaluate.masks import DegenerateMapError, cam_top_fraction_mask, lime_weight_map
from xai_exp.evaluate.overlap import iou

LIME = "LIME"
MATRIX_COLUMNS = ("a", "b", "images", "mean_top_f_iou", "mean_spearman")


@dataclass(frozen=True)
class MapSource:
    """Where one image's maps of one run are: the run's cache and the image's keys."""

    cache: ExplanationCache
    keys: Mapping[str, str]  # cam, segments, lime

    def cam(self) -> np.ndarray | None:
        """The CAM map, or None when the cache no longer has it."""
        entry = self.cache.load("cam", self.keys.get("cam", ""))
        return None if entry is None else entry.arrays.get("cam")

    def lime(self) -> np.ndarray | None:
        """LIME's per-pixel weight map, or None when the cache no longer has it."""
        segments = self.cache.load("segments", self.keys.get("segments", ""))
        weights = self.cache.load("lime", self.keys.get("lime", ""))
        if segments is None or weights is None:
            return None
        return lime_weight_map(segments.arrays["segments"], weights.arrays["weights"])


def _pair(first: np.ndarray, second: np.ndarray, fraction: float) -> tuple[float, float] | None:
    try:
        masks = cam_top_fraction_mask(first, fraction), cam_top_fraction_mask(second, fraction)
        return iou(*masks), rank_correlation(first, second)
    except DegenerateMapError:
        return None


def agreement_matrix(
    sources: Mapping[str, Mapping[str, MapSource]], fraction: float
) -> pd.DataFrame:
    """Every pair of methods (and LIME) on the images all methods have: mean top-f IoU and
    mean Spearman. `sources` maps each method to its images' `MapSource`; LIME's maps come from
    the first method's runs (LIME does not depend on the CAM method). Images whose map is
    missing from the cache or degenerate are left out of that pair (`images` counts the rest).
    """
    methods = sorted(sources)
    shared = sorted(set.intersection(*(set(found) for found in sources.values())))
    maps: dict[str, dict[str, np.ndarray]] = {name: {} for name in [*methods, LIME]}
    for image in shared:
        for method in methods:
            found = sources[method][image].cam()
            if found is not None:
                maps[method][image] = np.asarray(found, dtype=np.float64)
        lime = sources[methods[0]][image].lime()
        if lime is not None:
            maps[LIME][image] = np.asarray(lime, dtype=np.float64)
    rows = []
    for first, second in itertools.combinations([*methods, LIME], 2):
        pairs = [
            pair
            for image in shared
            if image in maps[first] and image in maps[second]
            if (pair := _pair(maps[first][image], maps[second][image], fraction)) is not None
        ]
        rows.append(
            {
                "a": first,
                "b": second,
                "images": len(pairs),
                "mean_top_f_iou": float(np.mean([p[0] for p in pairs])) if pairs else np.nan,
                "mean_spearman": float(np.mean([p[1] for p in pairs])) if pairs else np.nan,
            }
        )
    return pd.DataFrame(rows, columns=list(MATRIX_COLUMNS))


def as_matrix(pairs: pd.DataFrame, value: str) -> pd.DataFrame:
    """The long table of one group as a symmetric method x method matrix (diagonal 1)."""
    names = list(dict.fromkeys([*pairs["a"], *pairs["b"]]))
    matrix = pd.DataFrame(np.eye(len(names)), index=names, columns=names)
    for row in pairs.itertuples():
        matrix.loc[row.a, row.b] = matrix.loc[row.b, row.a] = getattr(row, value)
    return matrix
