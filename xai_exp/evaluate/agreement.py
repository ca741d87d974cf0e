"""Threshold-free agreement between a CAM map and LIME's superpixel-weight map."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xai_exp.evaluate.masks import cam_top_fraction_mask, check_map
from xai_exp.evaluate.overlap import iou

DEFAULT_FRACTIONS = np.linspace(0.01, 0.5, 50)


def _check_fractions(fractions: np.ndarray) -> np.ndarray:
    fractions = np.asarray(fractions, dtype=float)
    if fractions.ndim != 1 or fractions.size == 0:
        raise ValueError("fractions must be a non-empty 1-D sequence")
    if np.any(fractions <= 0) or np.any(fractions > 1):
        raise ValueError("fractions must lie in (0, 1]")
    if np.any(np.diff(fractions) <= 0):
        raise ValueError("fractions must be strictly increasing")
    return fractions


def iou_curve(
    cam: np.ndarray, lime_map: np.ndarray, fractions: np.ndarray = DEFAULT_FRACTIONS
) -> tuple[np.ndarray, np.ndarray]:
    """IoU of the two maps' top-f masks at each fraction f (ties at the cut kept in both masks).

    The masks are `cam_top_fraction_mask`'s: a map's minimum plateau never fills one, so at
    f = 1 each mask is the pixels above its map's minimum.

    Returns (fractions, ious). A constant or non-finite map raises DegenerateMapError.
    """
    if cam.shape != lime_map.shape:
        raise ValueError(f"map shapes differ: {cam.shape} vs {lime_map.shape}")
    fractions = _check_fractions(fractions)
    check_map(cam, "CAM map")
    check_map(lime_map, "LIME weight map")
    ious = np.array(
        [iou(cam_top_fraction_mask(cam, f), cam_top_fraction_mask(lime_map, f)) for f in fractions]
    )
    return fractions, ious


def curve_area(fractions: np.ndarray, values: np.ndarray) -> float:
    """Trapezoid area under the curve divided by the width of the fraction range (ones -> 1).

    A single point has no width; its value is returned.
    """
    x = np.asarray(fractions, dtype=float)
    y = np.asarray(values, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError("fractions and values must be 1-D arrays of the same non-zero length")
    if x.size == 1:
        return float(y[0])
    width = float(x[-1] - x[0])
    if width <= 0:
        raise ValueError("fractions must be increasing")
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0 / width)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their positions (scipy's "average")."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse.ravel()]


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation over pixels (average ranks for ties).

    A constant or non-finite map raises DegenerateMapError (its correlation is undefined).
    """
    if a.shape != b.shape:
        raise ValueError(f"map shapes differ: {a.shape} vs {b.shape}")
    check_map(np.asarray(a), "first map")
    check_map(np.asarray(b), "second map")
    rank_a = _average_ranks(np.asarray(a, dtype=np.float64).ravel())
    rank_b = _average_ranks(np.asarray(b, dtype=np.float64).ravel())
    rank_a -= rank_a.mean()
    rank_b -= rank_b.mean()
    rho = float(rank_a @ rank_b / np.sqrt((rank_a @ rank_a) * (rank_b @ rank_b)))
    return min(1.0, max(-1.0, rho))


def pointing_game(cam: np.ndarray, lime_mask: np.ndarray) -> bool:
    """Hit if the CAM's peak lies in the LIME mask.

    The peak is the first maximal pixel in row-major order (`np.argmax`), so among tied maxima
    only that one counts. A constant or non-finite CAM raises DegenerateMapError.
    """
    if cam.shape != lime_mask.shape:
        raise ValueError(f"shapes differ: {cam.shape} vs {lime_mask.shape}")
    check_map(cam, "CAM map")
    return bool(lime_mask.ravel()[int(np.argmax(cam))])


@dataclass
class Agreement:
    """IoU-vs-fraction curve and the scalar agreement metrics of one image."""

    fractions: np.ndarray
    ious: np.ndarray
    iou_auc: float
    spearman: float
    pointing_game: bool

    def metrics(self) -> dict[str, float]:
        """Scalars for logging: iou_auc, spearman, pointing_game (1.0 hit / 0.0 miss)."""
        return {
            "iou_auc": self.iou_auc,
            "spearman": self.spearman,
            "pointing_game": float(self.pointing_game),
        }


def agreement(
    cam: np.ndarray,
    lime_map: np.ndarray,
    lime_mask: np.ndarray,
    fractions: np.ndarray = DEFAULT_FRACTIONS,
) -> Agreement:
    """Agreement of a CAM map with the reference's pixel map (LIME's: `lime_weight_map`):
    curve, AUC, Spearman and the pointing game into the reference's mask."""
    fractions, ious = iou_curve(cam, lime_map, fractions)
    return Agreement(
        fractions=fractions,
        ious=ious,
        iou_auc=curve_area(fractions, ious),
        spearman=rank_correlation(cam, lime_map),
        pointing_game=pointing_game(cam, lime_mask),
    )
