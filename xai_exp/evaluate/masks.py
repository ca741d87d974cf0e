"""Binary masks from explanations: CAM top fraction of pixels, LIME top positive superpixels."""

from __future__ import annotations

import math

import numpy as np


class DegenerateMapError(ValueError):
    """A map that no threshold can turn into a meaningful mask (constant, NaN, no positive)."""


def check_map(values: np.ndarray, name: str = "CAM map") -> None:
    """Raise DegenerateMapError for a map with NaN/inf or a single value (it ranks nothing)."""
    if not np.all(np.isfinite(values)):
        raise DegenerateMapError(f"{name} has NaN or infinite values")
    if values.size == 0:
        raise DegenerateMapError(f"{name} is empty")
    if float(values.max()) - float(values.min()) <= 1e-12:
        raise DegenerateMapError(f"{name} is constant ({float(values.max()):.3g} everywhere)")


def cam_top_fraction_mask(cam: np.ndarray, fraction: float) -> np.ndarray:
    """Pixels among the top `fraction` of the map; ties at the cut are all kept.

    The mask covers at least ceil(fraction * pixels) pixels and at most one tie group more,
    except that pixels at the map's minimum (a ReLU-ed CAM's zero plateau) never fill it: when
    fewer than `fraction` of the pixels are above the minimum, the mask is exactly those
    (`signal_fraction` says when).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    check_map(cam)
    count = max(1, math.ceil(fraction * cam.size - 1e-9))
    flat = cam.ravel()
    cut = np.partition(flat, flat.size - count)[flat.size - count]
    lowest = flat.min()
    return cam > lowest if cut <= lowest else cam >= cut


def signal_fraction(cam: np.ndarray) -> float:
    """Share of the map's pixels above its minimum: what a top-fraction mask can cover."""
    return float((cam > cam.min()).mean())


def lime_top_k_mask(segments: np.ndarray, weights: np.ndarray, k: int) -> np.ndarray:
    """Union of the k superpixels with the largest positive weights (lime's positive_only)."""
    chosen = _positive_by_weight(weights)[:k]
    return np.isin(segments, chosen)


def lime_area_matched_mask(
    segments: np.ndarray, weights: np.ndarray, target_pixels: int
) -> np.ndarray:
    """Positive superpixels by descending weight until they cover `target_pixels` pixels."""
    sizes = np.bincount(segments.ravel(), minlength=len(weights))
    chosen, covered = [], 0
    for segment_id in _positive_by_weight(weights):
        if covered >= target_pixels:
            break
        chosen.append(segment_id)
        covered += int(sizes[segment_id])
    return np.isin(segments, chosen)


ZERO_WEIGHT = 1e-12  # LIME weights all below this (a black image's 1e-32) rank nothing


def _positive_by_weight(weights: np.ndarray) -> np.ndarray:
    """Ids of positive-weight superpixels, largest weight first (stable on ties).

    Weights that are all zero (below `ZERO_WEIGHT`, as LIME gives a black image) or not finite
    are degenerate, like a constant CAM: the ranking would be noise."""
    if not np.all(np.isfinite(weights)):
        raise DegenerateMapError("LIME weights have NaN or infinite values")
    largest = float(np.abs(weights).max()) if weights.size else 0.0
    if largest < ZERO_WEIGHT:
        raise DegenerateMapError(f"LIME weights are all zero (largest |weight| {largest:.3g})")
    order = np.argsort(-weights, kind="stable")
    positive = order[weights[order] > 0]
    if positive.size == 0:
        raise DegenerateMapError("LIME found no superpixel with positive weight")
    return positive


def lime_weight_map(segments: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per-pixel LIME weight (the weight of the pixel's superpixel)."""
    return weights[segments].astype(np.float32)
