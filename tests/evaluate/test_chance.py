"""Agreement above chance: the chance level and ceiling of IoU, the corrected agreement, and
how `compare` and the statistics use them (small samples said to be small)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from conftest import EXPERIMENT, FakeImage
from scipy import stats

from xai_exp.compare import comparison as cmp
from xai_exp.evaluate.overlap import chance_corrected, iou, iou_ceiling, iou_chance
from xai_exp.evaluate.statistics import (
    min_test_images,
    paired_difference,
    smallest_wilcoxon_p,
    too_few_to_test,
)


def _mask(pixels: int, chosen) -> np.ndarray:
    mask = np.zeros(pixels, dtype=bool)
    mask[list(chosen)] = True
    return mask


@pytest.mark.parametrize(("first", "second"), [(2, 4), (3, 3), (1, 8), (5, 7), (0, 3), (9, 4)])
def test_chance_and_ceiling_are_the_mean_and_max_over_every_placement(first, second):
    pixels = 9
    scores = [
        iou(_mask(pixels, a), _mask(pixels, b))
        for a in itertools.combinations(range(pixels), first)
        for b in itertools.combinations(range(pixels), second)
    ]
    assert iou_chance(first, second, pixels) == pytest.approx(np.mean(scores), abs=1e-12)
    assert iou_ceiling(first, second) == pytest.approx(max(scores), abs=1e-12)


def test_chance_matches_a_monte_carlo_estimate_at_image_size():
    rng = np.random.default_rng(0)
    pixels, first, second = 56 * 56, 314, 690  # a top-10% CAM mask against a 22% LIME mask
    draws = []
    for _ in range(3000):
        a = _mask(pixels, rng.choice(pixels, first, replace=False))
        b = _mask(pixels, rng.choice(pixels, second, replace=False))
        draws.append(iou(a, b))
    error = np.std(draws) / math.sqrt(len(draws))
    assert abs(iou_chance(first, second, pixels) - np.mean(draws)) < 4 * error
    # and close to the textbook ratio of expectations, ab / (a + b - ab) in fractions
    fa, fb = first / pixels, second / pixels
    assert iou_chance(first, second, pixels) == pytest.approx(fa * fb / (fa + fb - fa * fb), 0.02)


def test_corrected_agreement_is_zero_for_random_masks_and_one_for_identical_ones():
    rng = np.random.default_rng(1)
    pixels = 40 * 40
    corrected = []
    for _ in range(3000):
        a = _mask(pixels, rng.choice(pixels, 160, replace=False))
        b = _mask(pixels, rng.choice(pixels, 350, replace=False))
        corrected.append(chance_corrected(a, b)["iou_corrected"])
    assert abs(np.mean(corrected)) < 4 * np.std(corrected) / math.sqrt(len(corrected))
    same = _mask(pixels, range(200))
    assert chance_corrected(same, same) == pytest.approx(
        {"iou": 1.0, "iou_chance": iou_chance(200, 200, pixels), "iou_ceiling": 1.0,
         "iou_corrected": 1.0}
    )  # fmt: skip
    inside = chance_corrected(_mask(pixels, range(50)), same)  # as close as the sizes allow
    assert inside["iou"] == inside["iou_ceiling"] == 0.25
    assert inside["iou_corrected"] == pytest.approx(1.0)
    apart = chance_corrected(_mask(pixels, range(50)), _mask(pixels, range(100, 300)))
    assert apart["iou"] == 0.0
    assert apart["iou_corrected"] < 0  # worse than chance
    whole = chance_corrected(_mask(pixels, range(50)), np.ones(pixels, dtype=bool))
    assert whole["iou_corrected"] is None  # a whole-image mask leaves no room above chance


@pytest.mark.parametrize("pairs", range(1, 9))
def test_the_smallest_p_is_the_exact_wilcoxon_floor(pairs):
    all_positive = np.arange(1, pairs + 1, dtype=float)
    exact = stats.wilcoxon(all_positive, method="exact").pvalue
    assert smallest_wilcoxon_p(pairs) == pytest.approx(exact)
    assert (too_few_to_test(pairs) is None) == (exact < 0.05)
    assert min_test_images() == 6


def test_a_paired_test_below_six_images_gives_no_p_value_but_says_why():
    few = paired_difference([0.5, 0.6, 0.7], [0.1, 0.2, 0.3])
    assert math.isnan(few.wilcoxon_p)
    assert "too few images to test (n = 3)" in few.note
    enough = paired_difference(list(np.linspace(0.3, 0.9, 8)), [0.1] * 8)
    assert enough.wilcoxon_p == pytest.approx(2 / 2**8)
    assert "too few" not in enough.note
    assert "interval from 8 < 10 images" in enough.note  # intervals at n < 10 are flagged
    many = paired_difference(list(np.linspace(0.3, 0.9, 12)), [0.1] * 12)
    assert many.note == ""


def _area_study(client, exp, make_study_run, images: int):
    """Three thresholds whose raw IoU rises with the CAM mask's area while the agreement above
    chance falls: the situation the comparison must not misreport."""
    rng = np.random.default_rng(3)
    names = [f"img{n}" for n in range(images)]
    levels = {0.05: (0.04, 0.10), 0.1: (0.07, 0.08), 0.2: (0.11, 0.06)}
    for fraction, (chance, above) in levels.items():
        fakes = []
        for name in names:
            corrected = above + rng.normal(0, 0.01)
            ceiling = 0.5
            value = chance + corrected * (ceiling - chance)
            fakes.append(
                FakeImage(
                    name,
                    value,
                    values={
                        "iou_chance": chance,
                        "iou_ceiling": ceiling,
                        "iou_corrected": corrected,
                    },
                )
            )
        make_study_run(client, exp, fakes, cam_top_fraction=fraction)


def test_compare_leads_with_agreement_above_chance_and_says_when_area_ranks(
    tracking_store, make_study_run
):
    store = tracking_store
    _area_study(store.client, store.experiment_id, make_study_run, images=12)
    out = store.root / "out"
    comparison = cmp.compare(store.uri, EXPERIMENT, None, out)
    table = comparison.table
    columns = list(table.columns)
    assert columns.index("mean_iou_corrected") < columns.index("mean_iou")
    raw = table.set_index("cam_top_fraction")["mean_iou"]
    assert raw[0.05] < raw[0.1] < raw[0.2]  # raw IoU ranks the areas
    found = comparison.verdict
    assert found is not None
    assert found.metric == "iou_corrected"
    assert found.best.label == "cam_top_fraction=0.05"
    assert found.worst.label == "cam_top_fraction=0.2"
    assert found.differ is True
    assert "the raw ranking is mostly mask area" in found.area
    assert "cam_top_fraction=0.2 above cam_top_fraction=0.05" in found.area
    findings = comparison.findings()
    assert findings[0].startswith("best agreement above chance: cam_top_fraction=0.05")
    page = (out / cmp.HTML_NAME).read_text(encoding="utf-8")
    assert "the raw ranking is mostly mask area" in page
    paired = pd.read_csv(out / cmp.PAIRED_NAME)
    assert set(paired["metric"]) == {"iou_corrected", "iou"}
    corrected = paired[paired["metric"] == "iou_corrected"].set_index(["a", "b"])
    assert corrected.loc[(0.05, 0.2), "mean_difference"] > 0  # top5 agrees more above chance
    raw_pairs = paired[paired["metric"] == "iou"].set_index(["a", "b"])
    assert raw_pairs.loc[(0.05, 0.2), "mean_difference"] < 0  # raw IoU says the opposite


def test_compare_refuses_a_p_value_at_three_images(tracking_store, make_study_run):
    store = tracking_store
    _area_study(store.client, store.experiment_id, make_study_run, images=3)
    comparison = cmp.compare(store.uri, EXPERIMENT, None, store.root / "out")
    assert comparison.paired["wilcoxon_p"].isna().all()
    assert comparison.paired["note"].str.contains("too few images to test \\(n = 3\\)").all()
    findings = comparison.findings()
    assert any("too few images to test (n = 3)" in line for line in findings)
    assert findings[-1] == "every interval from 3 < 10 images: covers less than 95%"


def test_the_bar_chart_and_the_overlay_show_the_chance_level():
    from conftest import drawn_result

    from xai_exp.outputs import plots

    result = drawn_result(iou=0.4)
    result.values["iou_chance"] = 0.123
    axis = plots.iou_bar_chart([result], "setting").axes[0]
    [ticks] = [c for c in axis.collections if c.get_label().startswith("chance")]
    assert ticks.get_offsets()[0][1] == pytest.approx(0.123)
    figure = plots.overlay_figure(result, "gradcam")
    [panel] = [a for a in figure.axes if a.get_title().startswith("CAM mask vs LIME mask")]
    legend = panel.get_legend()
    drawn = chance_corrected(result.arrays["cam_mask"], result.arrays["lime_mask"])
    title = legend.get_title().get_text()
    assert f"random masks of these sizes: IoU {drawn['iou_chance']:.3f}" in title
    assert f"above chance {drawn['iou_corrected']:+.2f}" in title
