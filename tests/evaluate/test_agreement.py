"""Threshold-free CAM/LIME agreement: IoU curve and its area, Spearman, pointing game."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.stats import spearmanr

from xai_exp.evaluate.agreement import (
    DEFAULT_FRACTIONS,
    agreement,
    curve_area,
    iou_curve,
    pointing_game,
    rank_correlation,
)
from xai_exp.evaluate.masks import DegenerateMapError, cam_top_fraction_mask, lime_weight_map
from xai_exp.evaluate.overlap import iou


def grid_segments(size: int = 16, cell: int = 4) -> np.ndarray:
    """Square superpixels of `cell` pixels, ids 0..n-1 in row-major order."""
    per_row = size // cell
    rows, cols = np.indices((size, size)) // cell
    return (rows * per_row + cols).astype(np.int32)


def smooth_map(size: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((size, size)).astype(np.float32)


def test_identical_maps_agree_perfectly():
    segments = grid_segments()
    weights = np.random.default_rng(1).normal(size=segments.max() + 1)
    cam = lime_weight_map(segments, weights)
    lime_mask = np.isin(segments, np.argsort(-weights)[:3])

    result = agreement(cam, lime_weight_map(segments, weights), lime_mask)

    np.testing.assert_array_equal(result.ious, 1.0)
    assert result.fractions.shape == DEFAULT_FRACTIONS.shape
    assert result.iou_auc == pytest.approx(1.0)
    assert result.spearman == pytest.approx(1.0)
    assert result.pointing_game is True
    assert result.metrics() == {
        "iou_auc": pytest.approx(1.0),
        "spearman": pytest.approx(1.0),
        "pointing_game": 1.0,
    }


def test_identical_pixel_maps_give_unit_curve():
    cam = smooth_map()
    fractions, ious = iou_curve(cam, cam.copy())
    np.testing.assert_array_equal(ious, 1.0)
    assert curve_area(fractions, ious) == pytest.approx(1.0)


def test_negated_map_has_spearman_minus_one():
    cam = smooth_map()
    assert rank_correlation(cam, -cam) == pytest.approx(-1.0)
    segments = grid_segments()
    lime_map = lime_weight_map(segments, np.arange(segments.max() + 1, dtype=float))
    assert rank_correlation(lime_map, -lime_map) == pytest.approx(-1.0)  # with tie groups


def test_disjoint_top_regions_have_near_zero_auc():
    size = 16
    cols = np.indices((size, size))[1].astype(np.float32)
    cam = size - cols  # peaks at the left edge
    segments = grid_segments(size)
    weights = np.array([float(c) for c in range(4)] * 4)  # superpixel column index: right wins
    lime_mask = np.isin(segments, np.flatnonzero(weights == weights.max()))

    metrics = agreement(cam, lime_weight_map(segments, weights), lime_mask).metrics()

    assert metrics["iou_auc"] < 0.05
    assert metrics["spearman"] < -0.9
    assert metrics["pointing_game"] == 0.0


def test_lime_curve_keeps_whole_superpixels_at_the_cut():
    segments = grid_segments(16, 4)  # 16 superpixels of 16 pixels
    weights = np.arange(16, dtype=float)
    lime_map = lime_weight_map(segments, weights)
    cam = smooth_map()
    fraction = 0.05  # 13 pixels: inside the best superpixel, which is kept whole
    _, ious = iou_curve(cam, lime_map, np.array([fraction]))
    lime_mask = segments == 15
    assert ious[0] == pytest.approx(iou(cam_top_fraction_mask(cam, fraction), lime_mask))


def test_constant_maps_are_degenerate():
    cam = smooth_map()
    flat = np.full_like(cam, 0.3)
    with pytest.raises(DegenerateMapError):
        iou_curve(flat, cam)
    with pytest.raises(DegenerateMapError):
        iou_curve(cam, flat)
    with pytest.raises(DegenerateMapError):
        rank_correlation(cam, flat)
    with pytest.raises(DegenerateMapError):
        pointing_game(flat, cam > 0.5)
    nan_map = cam.copy()
    nan_map[0, 0] = np.nan
    with pytest.raises(DegenerateMapError):
        rank_correlation(nan_map, cam)


def test_bad_inputs_are_rejected():
    cam = smooth_map()
    with pytest.raises(ValueError, match="shapes"):
        iou_curve(cam, cam[:-1])
    with pytest.raises(ValueError, match="increasing"):
        iou_curve(cam, cam, np.array([0.3, 0.2]))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        iou_curve(cam, cam, np.array([0.0, 0.2]))


def test_curve_area_is_normalised():
    x = np.linspace(0.2, 0.6, 9)
    assert curve_area(x, np.ones_like(x)) == pytest.approx(1.0)
    assert curve_area(np.linspace(0, 1, 11), np.linspace(0, 1, 11)) == pytest.approx(0.5)
    assert curve_area(np.array([0.3]), np.array([0.7])) == pytest.approx(0.7)


def test_pointing_game_uses_first_argmax():
    cam = np.zeros((4, 4), dtype=np.float32)
    cam[1, 2] = cam[3, 0] = 1.0  # tied maxima; (1, 2) comes first in row-major order
    inside_first = np.zeros((4, 4), dtype=bool)
    inside_first[1, 2] = True
    assert pointing_game(cam, inside_first) is True
    assert pointing_game(cam, ~inside_first) is False


@settings(max_examples=60, deadline=None)
@given(
    a=arrays(np.float64, (6, 5), elements=st.floats(-10, 10)),
    b=arrays(np.float64, (6, 5), elements=st.floats(-10, 10)),
)
def test_rank_correlation_matches_scipy(a, b):
    if np.ptp(a) <= 1e-12 or np.ptp(b) <= 1e-12:
        with pytest.raises(DegenerateMapError):
            rank_correlation(a, b)
        return
    expected = spearmanr(a.ravel(), b.ravel()).statistic
    assert rank_correlation(a, b) == pytest.approx(expected, abs=1e-9)
    assert rank_correlation(a, b) == pytest.approx(rank_correlation(b, a))
    # ranks only: an exact order-preserving rescale changes nothing
    assert rank_correlation(a, 4.0 * b) == pytest.approx(rank_correlation(a, b))


@settings(max_examples=60, deadline=None)
@given(
    a=arrays(np.float32, (8, 8), elements=st.floats(0, 1, width=32)),
    b=arrays(np.float32, (8, 8), elements=st.floats(0, 1, width=32)),
)
def test_iou_curve_is_symmetric_and_bounded(a, b):
    if np.ptp(a) <= 1e-12 or np.ptp(b) <= 1e-12:
        return
    fractions = np.linspace(0.05, 1.0, 20)
    _, ab = iou_curve(a, b, fractions)
    _, ba = iou_curve(b, a, fractions)
    np.testing.assert_allclose(ab, ba)
    assert np.all((ab >= 0) & (ab <= 1))
    # at fraction 1 each mask is every pixel above its map's minimum (a plateau never fills)
    assert ab[-1] == iou(a > a.min(), b > b.min())
    assert 0.0 <= curve_area(fractions, ab) <= 1.0
