"""The study pipeline on a tiny CNN: cache reuse, flags, failures, determinism."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from tiny_models import SMOOTH_ITEMS, smooth_item, tiny_classifier
from tiny_models import smooth_study_config as config

from xai_exp.cache import ExplanationCache
from xai_exp.config import ConfigError
from xai_exp.study.pipeline import Study, run_study

IMAGES = SMOOTH_ITEMS


def test_threshold_change_reuses_every_explanation(tmp_path):
    classifier = tiny_classifier()
    cache = ExplanationCache(tmp_path)
    first = Study(config(0.1), classifier, cache)
    results = run_study(first, IMAGES, progress=False)
    assert (first.computed, first.reused) == (6, 0)  # CAM, superpixels, LIME per image

    second = Study(config(0.3), classifier, cache)
    again = run_study(second, IMAGES, progress=False)
    assert (second.computed, second.reused) == (0, 6)
    assert all(r.cam_reused and r.reference_reused and r.segmentation_reused for r in again)
    # reused runtimes are the ones measured when computed
    assert [r.values["cam_seconds"] for r in again] == [r.values["cam_seconds"] for r in results]
    assert all(
        b.cam_mask_fraction > a.cam_mask_fraction for a, b in zip(results, again, strict=True)
    )


def test_sample_count_recomputes_lime_but_not_superpixels(tmp_path):
    classifier = tiny_classifier()
    cache = ExplanationCache(tmp_path)
    run_study(Study(config(), classifier, cache), IMAGES[:1], progress=False)
    study = Study(config(), classifier, cache)
    study.cfg.lime.num_samples = 60
    [result] = run_study(study, IMAGES[:1], progress=False)
    assert (result.cam_reused, result.segmentation_reused, result.reference_reused) == (
        True,
        True,
        False,
    )


def test_same_config_twice_gives_identical_iou(tmp_path):
    runs = []
    for _ in range(2):
        study = Study(config(), tiny_classifier(), ExplanationCache(enabled=False))
        runs.append([r.iou for r in run_study(study, IMAGES, progress=False)])
    assert runs[0] == runs[1]
    assert all(value is not None and 0 <= value <= 1 for value in runs[0])


def test_dead_model_is_flagged_not_thresholded():
    classifier = tiny_classifier()
    with torch.no_grad():
        for parameter in classifier.model.features.parameters():
            parameter.zero_()  # target layer output is 0 everywhere: constant map, flat LIME
    study = Study(config(), classifier, ExplanationCache(enabled=False))
    [result] = run_study(study, IMAGES[:1], progress=False)
    assert result.status == "flagged"
    assert result.iou is None
    assert "constant" in result.reason
    assert "LIME weights are all zero" in result.reason
    assert "cam_mask" not in result.arrays


def test_a_cam_with_little_signal_gives_the_signal_as_mask_and_says_so(monkeypatch):
    sparse = np.zeros((32, 32), dtype=np.float32)
    sparse[:4, :12] = np.linspace(0.1, 1.0, 48).reshape(4, 12)  # 48 of 1024 pixels: 4.7%
    monkeypatch.setattr(
        Study, "_cam_map", lambda self, classifier, view, target, method=None: sparse
    )
    study = Study(config(0.1), tiny_classifier(), ExplanationCache(enabled=False))
    [result] = run_study(study, IMAGES[:1], progress=False)
    assert result.cam_mask_fraction == pytest.approx(48 / 1024)  # not the whole image
    assert result.values["cam_mask_short"] is True
    assert "CAM signal covers 4.7% of the pixels, under the top 10% asked" in result.reason
    assert result.iou is not None
    monkeypatch.undo()
    [normal] = run_study(Study(config(0.1), tiny_classifier(), ExplanationCache(enabled=False)),
                         IMAGES[:1], progress=False)  # fmt: skip
    assert normal.values["cam_mask_short"] is False


def test_one_failing_image_does_not_lose_the_others():
    broken = dataclasses.replace(smooth_item("broken", 3), image=np.zeros((0, 0, 3), np.uint8))
    study = Study(config(), tiny_classifier(), ExplanationCache(enabled=False))
    seen = []
    results = run_study(
        study, [IMAGES[0], broken, IMAGES[1]], on_result=lambda i, r: seen.append(i)
    )
    assert [r.status for r in results] == ["ok", "error", "ok"]
    assert results[1].reason
    assert "\n" not in results[1].reason
    assert seen == [0, 1, 2]


def test_target_class_out_of_range_fails_before_compute():
    cfg = config()
    cfg.method.target_class = 10
    with pytest.raises(ConfigError, match=r"out of range.*10 classes"):
        Study(cfg, tiny_classifier(), ExplanationCache(enabled=False))


def test_configured_target_class_is_explained():
    cfg = config()
    cfg.method.target_class = 7
    [result] = run_study(Study(cfg, tiny_classifier(), ExplanationCache(enabled=False)), IMAGES[:1])
    assert result.target_class == 7
    assert result.target_label == "class7"
    assert not math.isnan(result.probability)


def test_metrics_beyond_iou_are_computed_once_and_reused_across_thresholds(tmp_path):
    classifier = tiny_classifier()
    cache = ExplanationCache(tmp_path)
    cfg = config(0.1)
    cfg.metrics.faithfulness = cfg.metrics.sanity = True
    cfg.metrics.steps, cfg.metrics.sanity_layers = 5, 2
    [first] = run_study(Study(cfg, classifier, cache), IMAGES[1:], progress=False)
    for name in ("iou_auc", "spearman", "cam_deletion_auc", "reference_insertion_auc"):
        assert 0 <= abs(first.values[name]) <= 1, name
    assert first.values["pointing_game"] in (0.0, 1.0)
    assert first.values["randomisation_passed"] == (abs(first.values["randomisation_rho"]) < 0.5)
    assert set(first.arrays["faithfulness"]) == {"cam", "reference"}

    cfg.threshold.cam_top_fraction = 0.3
    hits_before = cache.hits
    [second] = run_study(Study(cfg, classifier, cache), IMAGES[1:], progress=False)
    assert cache.hits - hits_before == 7  # prediction, 3 explanations, 2 curves, sanity check
    assert second.values["cam_deletion_auc"] == first.values["cam_deletion_auc"]
    assert second.values["randomisation_rho"] == first.values["randomisation_rho"]
    assert (
        second.values["iou_auc"] == first.values["iou_auc"]
    )  # threshold-free: independent of the cut


def test_several_lime_seeds_give_lime_self_agreement_and_iou_per_seed(tmp_path):
    from xai_exp.evaluate.overlap import iou
    from xai_exp.evaluate.results import summary_metrics

    classifier = tiny_classifier()
    cache = ExplanationCache(tmp_path)
    singles = {}
    for seed in (0, 1, 2):  # each seed alone, as the reference
        study = Study(config(seed=seed), classifier, cache)
        [singles[seed]] = run_study(study, IMAGES[:1], progress=False)
    cfg = config()
    cfg.lime.seeds = [0, 1, 2]
    study = Study(cfg, classifier, cache)
    [result] = run_study(study, IMAGES[:1], progress=False)
    assert (study.computed, study.reused) == (0, 5)  # every seed's LIME came from the cache
    per_seed = [singles[seed].iou for seed in (0, 1, 2)]
    logged = [float(v) if v else None for v in result.iou_by_seed.split(";")]
    assert [v is None for v in logged] == [v is None for v in per_seed]
    known = [v for v in per_seed if v is not None]
    assert [v for v in logged if v is not None] == pytest.approx(known, abs=1e-4)
    assert len(known) >= 2
    assert result.iou == pytest.approx(np.mean(known))
    masks = [singles[s].arrays["lime_mask"] for s in (0, 1, 2) if "lime_mask" in singles[s].arrays]
    pairwise = [iou(a, b) for n, a in enumerate(masks) for b in masks[n + 1 :]]
    assert result.values["lime_self_iou"] == pytest.approx(np.mean(pairwise))
    corrected = [singles[s].values["iou_corrected"] for s in (0, 1, 2) if singles[s].iou]
    assert result.values["iou_corrected"] == pytest.approx(np.mean(corrected))  # seeds averaged
    summary = summary_metrics([result])
    assert summary["mean_lime_self_iou"] == result.values["lime_self_iou"]
    assert summary["iou_over_lime_self_iou"] == pytest.approx(
        result.iou / result.values["lime_self_iou"]
    )


def test_each_image_records_its_chance_level_ceiling_and_agreement_above_chance():
    from xai_exp.evaluate.overlap import iou_ceiling, iou_chance

    study = Study(config(fraction=0.2), tiny_classifier(), ExplanationCache(enabled=False))
    results = run_study(study, IMAGES, progress=False)
    for result in results:
        cam_mask, lime_mask = result.arrays["cam_mask"], result.arrays["lime_mask"]
        first, second = int(cam_mask.sum()), int(lime_mask.sum())
        chance = iou_chance(first, second, cam_mask.size)
        ceiling = iou_ceiling(first, second)
        assert result.values["iou_chance"] == pytest.approx(chance)
        assert result.values["iou_ceiling"] == pytest.approx(ceiling)
        assert result.values["iou_corrected"] == pytest.approx(
            (result.iou - chance) / (ceiling - chance)
        )
        row = result.row()
        assert row["iou_corrected"] == result.values["iou_corrected"]  # a results.csv column


def test_editing_a_step_s_code_recomputes_its_entries_and_no_other_s(tmp_path, monkeypatch):
    import hashlib

    from xai_exp import cache as cache_module

    real = cache_module.module_digest
    source = (cache_module.Path(cache_module.__file__).parent / "explain" / "cam.py").read_bytes()
    assert real("xai_exp.explain.cam") == hashlib.sha256(source).hexdigest()

    def edit(*modules: str) -> None:  # as if these modules' code had been changed
        fake = {name: "edited" for name in modules}
        monkeypatch.setattr(cache_module, "module_digest", lambda name: fake.get(name, real(name)))

    def run() -> tuple:
        [result] = run_study(Study(config(), classifier, cache), IMAGES[:1], progress=False)
        reused = (result.cam_reused, result.segmentation_reused, result.reference_reused)
        return reused, result.iou

    classifier = tiny_classifier()
    cache = ExplanationCache(tmp_path)
    _, iou_first = run()
    edit(
        "xai_exp.compare.comparison", "xai_exp.outputs.plots", "xai_exp.track.runs"
    )  # no step's code
    assert run() == ((True, True, True), iou_first)
    edit("xai_exp.explain.cam")
    assert run()[0] == (False, True, True)
    edit("xai_exp.explain.lime")  # the CAM code is as first cached again
    assert run()[0] == (True, True, False)
    edit("xai_exp.explain.superpixels")  # LIME's key holds its superpixels'
    assert run()[0] == (True, False, False)
    edit("xai_exp.models.views")  # the view every step starts from
    assert run()[0] == (False, False, False)
    monkeypatch.setattr(cache_module, "module_digest", real)
    assert run() == ((True, True, True), iou_first)
