"""Explainer x explainer agreement on shared images, read from the explanation cache.

A sweep over methods or references explains the same images with each CAM method and each
reference (LIME, KernelSHAP, RISE, ...). Their maps are in the cache already, so every pair is
compared without recomputing anything: the mean IoU of the two maps' top-f masks (f: the runs'
`cam_top_fraction`, `masks.cam_top_fraction_mask` for both, superpixel weights painted on their
pixels) and the mean Spearman rank correlation of the maps.
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
from xai_exp.explain.registry import display_name

LIME = display_name("lime")
MATRIX_COLUMNS = ("a", "b", "images", "mean_top_f_iou", "mean_spearman")
# where a run's reference explanation is (explanation_keys.csv's `reference` column): LIME's
# weights, a registered explainer's weights or map, or a CAM's map
_REFERENCE_KINDS = (
    ("lime", "weights"),
    ("explainer", "weights"),
    ("explainer", "map"),
    ("cam", "cam"),
)


@dataclass(frozen=True)
class MapSource:
    """Where one image's maps of one run are: the run's cache and the image's keys."""

    cache: ExplanationCache
    keys: Mapping[str, str]  # cam, segments, reference

    def cam(self) -> np.ndarray | None:
        """The CAM map, or None when the cache no longer has it."""
        entry = self.cache.load("cam", self.keys.get("cam", ""))
        return None if entry is None else entry.arrays.get("cam")

    def reference(self) -> np.ndarray | None:
        """The reference's per-pixel map (superpixel weights painted on their pixels), or None
        when the cache no longer has it."""
        key = self.keys.get("reference", "")
        for kind, name in _REFERENCE_KINDS:
            entry = self.cache.load(kind, key) if key else None
            if entry is None or name not in entry.arrays:
                continue
            if name != "weights":
                return entry.arrays[name]
            segments = self.cache.load("segments", self.keys.get("segments", ""))
            if segments is None:
                return None
            return lime_weight_map(segments.arrays["segments"], entry.arrays[name])
        return None


@dataclass(frozen=True)
class ExplainerMaps:
    """One explainer's maps in a sweep: per image where a run of it keeps them, and which
    part of that run's keys (its CAM or its reference)."""

    images: Mapping[str, MapSource]
    part: str  # "cam" or "reference"

    def load(self, image: str) -> np.ndarray | None:
        source = self.images[image]
        return source.cam() if self.part == "cam" else source.reference()


def _pair(first: np.ndarray, second: np.ndarray, fraction: float) -> tuple[float, float] | None:
    try:
        masks = cam_top_fraction_mask(first, fraction), cam_top_fraction_mask(second, fraction)
        return iou(*masks), rank_correlation(first, second)
    except DegenerateMapError:
        return None


def agreement_matrix(sources: Mapping[str, ExplainerMaps], fraction: float) -> pd.DataFrame:
    """Every pair of explainers on the images all of them have: mean top-f IoU and mean
    Spearman. `sources` maps each explainer's name to where its maps are. Images whose map is
    missing from the cache or degenerate are left out of that pair (`images` counts the rest).
    """
    names = list(sources)
    shared = sorted(set.intersection(*(set(found.images) for found in sources.values())))
    maps: dict[str, dict[str, np.ndarray]] = {name: {} for name in names}
    for image in shared:
        for name in names:
            found = sources[name].load(image)
            if found is not None:
                maps[name][image] = np.asarray(found, dtype=np.float64)
    rows = []
    for first, second in itertools.combinations(names, 2):
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
