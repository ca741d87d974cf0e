"""With several LIME seeds the overlay draws one named seed's masks, titles them with that
seed's IoU and labels the mean over seeds as a mean; LIME-derived metrics say which seed."""

from __future__ import annotations

import re

import numpy as np
import pytest
from tiny_models import smooth_image, tiny_classifier

from xai_exp.cache import ExplanationCache
from xai_exp.config import LimeConfig, MethodConfig, StudyConfig, ThresholdConfig
from xai_exp.data.images import ImageItem
from xai_exp.evaluate.overlap import iou
from xai_exp.evaluate.results import METRICS, ImageResult
from xai_exp.outputs import plots
from xai_exp.study.pipeline import Study, run_study


def config(seeds: list[int]) -> StudyConfig:
    # hidden superpixels black: on these smooth images a mean-colour superpixel hides nothing,
    # and LIME's weights would be ~1e-32 (flagged as all zero)
    lime = LimeConfig(num_samples=25, batch_size=16, seeds=seeds, hide_color=0)
    lime.segmentation.algorithm = "slic"
    lime.segmentation.params = {"n_segments": 16, "compactness": 10, "start_label": 0}
    return StudyConfig(
        method=MethodConfig(name="gradcam"),
        threshold=ThresholdConfig(cam_top_fraction=0.1),
        lime=lime,
        progress=False,
    )


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """One image explained with LIME seeds 0, 1, 2, and with seed 0 alone."""
    classifier = tiny_classifier()
    cache = ExplanationCache(tmp_path_factory.mktemp("cache"))
    image = [ImageItem("a", "a", smooth_image(seed=3), "hash-a", "a")]  # seeds 0-2 disagree
    [alone] = run_study(Study(config([0]), classifier, cache), image, progress=False)
    [several] = run_study(Study(config([0, 1, 2]), classifier, cache), image, progress=False)
    return alone, several


def numbers(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"\d+\.\d{3}", text)]


def test_the_overlay_shows_the_iou_of_the_masks_it_draws(seeded):
    alone, several = seeded
    per_seed = several.iou_per_seed
    assert len(per_seed) == 3
    assert len({round(v, 3) for v in per_seed if v is not None}) > 1  # seeds disagree
    figure = plots.overlay_figure(several, "gradcam")
    panel = next(a.get_title() for a in figure.axes if a.get_title().startswith("CAM mask"))
    drawn = iou(several.arrays["cam_mask"], several.arrays["lime_mask"])
    first_line, second_line = panel.split("\n")
    assert "seed 0 drawn" in first_line
    assert numbers(first_line)[-1] == pytest.approx(drawn, abs=5e-4)  # the title's = drawn
    assert drawn == pytest.approx(alone.iou)  # and it is seed 0's own IoU
    assert drawn != pytest.approx(several.iou, abs=5e-4)  # not the mean over seeds
    assert second_line.startswith("mean over seeds 0, 1, 2:")
    assert numbers(second_line)[0] == pytest.approx(several.iou, abs=5e-4)
    suptitle = figure.get_suptitle()
    assert f"mean IoU over LIME seeds 0, 1, 2: {several.iou:.3f}" in suptitle
    assert any(a.get_title() == "LIME superpixel weights (seed 0)" for a in figure.axes)


def test_one_seed_titles_its_one_iou(seeded):
    alone, _ = seeded
    figure = plots.overlay_figure(alone, "gradcam")
    assert f"IoU {alone.iou:.3f}" in figure.get_suptitle()
    assert "mean" not in figure.get_suptitle()
    titles = [a.get_title() for a in figure.axes]
    assert f"CAM mask vs LIME mask: IoU {alone.iou:.3f}" in titles


def test_lime_derived_metrics_use_and_name_the_first_seed(seeded):
    alone, several = seeded
    for name in (
        "spearman",
        "iou_auc",
        "pointing_game",
        "reference_object_iou",
        "reference_deletion_auc",
    ):
        assert "first of lime.seeds" in METRICS[name].description, name
    for name in ("iou", "iou_chance", "iou_ceiling", "iou_corrected"):
        assert "mean over seeds" in METRICS[name].description, name
    assert several.values["spearman"] == alone.values["spearman"]  # computed from seed 0
    assert several.reference_mask_fraction == alone.reference_mask_fraction
    assert np.array_equal(several.arrays["lime_weights"], alone.arrays["lime_weights"])


def test_a_drawn_seed_without_a_mask_says_so_beside_the_mean():
    result = ImageResult("cat", "cat", values={"iou": 0.25}, lime_seeds=(4, 5))
    result.iou_by_seed = ";0.2500"
    result.arrays.update(cam_mask=np.ones((4, 4), bool))
    title = plots.agreement_title(result)
    assert title == (
        "CAM mask vs LIME mask (seed 4 drawn): no masks to draw\n"
        "mean over seeds 4, 5: 0.250 (n/a / 0.250)"
    )
