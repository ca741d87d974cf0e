"""LIME's agreement with itself is a yardstick, not a ceiling: the ratio to it is named as one."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from xai_exp.evaluate.overlap import iou
from xai_exp.evaluate.results import IOU_OVER_LIME_SELF_IOU, METRICS, ImageResult, summary_metrics


def test_the_issues_example_passes_one_and_is_not_called_a_ceiling():
    seeds = [np.array(row, dtype=bool) for row in ([1, 1, 0], [0, 1, 1], [1, 0, 1])]
    assert [iou(a, b) for a, b in itertools.combinations(seeds, 2)] == pytest.approx([1 / 3] * 3)
    cam = seeds[0] | seeds[1] | seeds[2]  # their union
    per_seed = [iou(cam, mask) for mask in seeds]
    self_iou = float(np.mean([iou(a, b) for a, b in itertools.combinations(seeds, 2)]))
    result = ImageResult("x", "x", values={"iou": float(np.mean(per_seed))})
    result.values["lime_self_iou"] = self_iou
    summary = summary_metrics([result])
    assert summary[IOU_OVER_LIME_SELF_IOU] == pytest.approx(2.0)
    assert "ceiling_normalised_iou" not in summary
    assert "not a bound" in METRICS["lime_self_iou"].description
    assert "ceiling" not in IOU_OVER_LIME_SELF_IOU
