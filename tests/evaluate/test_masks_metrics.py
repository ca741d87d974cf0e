"""Masks and IoU: properties over random maps, and the degenerate cases."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from xai_exp.evaluate.masks import (
    DegenerateMapError,
    cam_top_fraction_mask,
    lime_area_matched_mask,
    lime_top_k_mask,
    signal_fraction,
)
from xai_exp.evaluate.overlap import iou, summarize

maps = arrays(
    np.float32,
    st.tuples(st.integers(1, 12), st.integers(1, 12)),
    elements=st.floats(0, 1, width=32),
)
fractions = st.floats(0.001, 1.0)
masks = arrays(np.bool_, (6, 7))


@settings(max_examples=200, deadline=None)
@given(maps, fractions)
def test_cam_mask_covers_requested_area_up_to_one_tie_group(cam, fraction):
    if float(cam.max()) - float(cam.min()) <= 1e-12:  # constant up to float noise
        with pytest.raises(DegenerateMapError):
            cam_top_fraction_mask(cam, fraction)
        return
    mask = cam_top_fraction_mask(cam, fraction)
    wanted = max(1, math.ceil(fraction * cam.size - 1e-9))
    if (cam > cam.min()).sum() < wanted:  # too little signal: the mask is the signal alone
        assert np.array_equal(mask, cam > cam.min())
        return
    cut = cam[mask].min()
    ties = int((cam == cut).sum())
    assert wanted <= mask.sum() <= wanted + ties - 1
    assert (cam[mask] >= cam[~mask].max(initial=-np.inf)).all()  # every kept pixel outranks


def test_a_zero_plateau_never_fills_the_cam_mask():
    cam = np.zeros((20, 20), dtype=np.float32)
    cam[:3, :6] = np.linspace(0.1, 1.0, 18).reshape(3, 6)  # 18 of 400 pixels: 4.5% positive
    mask = cam_top_fraction_mask(cam, 0.10)
    assert mask.sum() == 18  # the signal, not the whole image
    assert np.array_equal(mask, cam > 0)
    assert signal_fraction(cam) == pytest.approx(0.045)
    shifted = cam - 3.0  # a minimum plateau below zero is no signal either
    assert np.array_equal(cam_top_fraction_mask(shifted, 0.10), mask)
    assert cam_top_fraction_mask(cam, 0.04).sum() == 16  # enough signal: the top 4% as asked


@given(masks, masks)
def test_iou_is_bounded_and_symmetric(a, b):
    value = iou(a, b)
    assert 0.0 <= value <= 1.0
    assert value == iou(b, a)


@given(masks)
def test_iou_of_a_mask_with_itself_is_one(a):
    assert iou(a, a) == 1.0


def test_iou_known_values_and_empty_union():
    a = np.array([[1, 1, 0, 0]], dtype=bool)
    b = np.array([[0, 1, 1, 0]], dtype=bool)
    assert iou(a, b) == pytest.approx(1 / 3)
    empty = np.zeros((2, 2), dtype=bool)
    assert iou(empty, empty) == 1.0
    assert iou(empty, ~empty) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        iou(a, empty)


def test_constant_and_nan_maps_are_flagged():
    with pytest.raises(DegenerateMapError, match="constant"):
        cam_top_fraction_mask(np.zeros((4, 4)), 0.1)
    nan_map = np.ones((4, 4))
    nan_map[0, 0] = np.nan
    with pytest.raises(DegenerateMapError, match="NaN"):
        cam_top_fraction_mask(nan_map, 0.1)


def test_lime_top_k_keeps_only_positive_superpixels_by_weight():
    segments = np.array([[0, 1, 2, 3]])
    weights = np.array([0.5, -0.9, 0.1, 0.7])
    assert lime_top_k_mask(segments, weights, 2).tolist() == [[True, False, False, True]]
    assert lime_top_k_mask(segments, weights, 10).tolist() == [[True, False, True, True]]
    with pytest.raises(DegenerateMapError, match="no superpixel with positive weight"):
        lime_top_k_mask(segments, -np.abs(weights), 3)


def test_lime_area_matched_adds_superpixels_until_area_is_covered():
    segments = np.array([[0, 0, 1, 1, 2, 2, 2, 3]])
    weights = np.array([0.2, 0.9, 0.5, -1.0])
    assert lime_area_matched_mask(segments, weights, 2).sum() == 2  # segment 1 alone
    assert lime_area_matched_mask(segments, weights, 3).sum() == 5  # 1 then 2
    assert lime_area_matched_mask(segments, weights, 100).sum() == 7  # all positives


def test_summarize_ignores_missing_values():
    stats = summarize([0.2, None, math.nan, 0.4])
    assert stats["count"] == 2
    assert stats["mean"] == pytest.approx(0.3)
    assert math.isnan(summarize([None])["mean"])
