"""Cascading model-parameter randomisation check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import smooth_image, tiny_classifier

from xai_exp.evaluate.masks import DegenerateMapError
from xai_exp.evaluate.sanity import parameterised_layers, randomisation_check
from xai_exp.explain.cam import compute_cam
from xai_exp.models.classifier import Classifier, resolve_layer

SIZE = 24
LAYERS = ["fc", "features.2", "features.0"]  # TinyCNN, output side first


def gradcam_explainer(image: np.ndarray, target: int):
    def explain(classifier: Classifier) -> np.ndarray:
        tensor = classifier.input_tensor(image)
        return compute_cam(classifier, tensor, "gradcam", target, implementation="reference")

    return explain


def test_layers_are_listed_output_first():
    assert parameterised_layers(tiny_classifier(0, SIZE).model) == LAYERS


def test_weight_independent_map_fails():
    classifier = tiny_classifier(0, SIZE)
    image = smooth_image(SIZE, 0)
    brightness = image.astype(np.float32).mean(axis=2)

    result = randomisation_check(classifier, lambda _c: brightness, threshold=0.5)

    assert [name for name, _ in result.correlations] == LAYERS
    assert [rho for _, rho in result.correlations] == pytest.approx([1.0] * 3)
    assert result.final_correlation == pytest.approx(1.0)
    assert result.passed is False


def test_gradcam_changes_under_randomisation():
    classifier = tiny_classifier(0, SIZE)
    image = smooth_image(SIZE, 0)
    gradient = np.add.outer(np.arange(SIZE), np.arange(SIZE)).astype(np.float32)
    independent = randomisation_check(classifier, lambda _c: gradient)

    result = randomisation_check(classifier, gradcam_explainer(image, 3))

    assert len(result.correlations) == 3
    assert abs(result.final_correlation) < independent.final_correlation - 0.5
    assert result.passed is True


def test_original_model_is_untouched_and_copy_is_consistent():
    classifier = tiny_classifier(0, SIZE)
    before = {k: v.clone() for k, v in classifier.model.state_dict().items()}
    image = smooth_image(SIZE, 1)
    seen: list[Classifier] = []
    explain = gradcam_explainer(image, 1)

    def recording(c: Classifier) -> np.ndarray:
        seen.append(c)
        return explain(c)

    randomisation_check(classifier, recording)

    after = classifier.model.state_dict()
    for name, tensor in before.items():
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=0)
    assert seen[0] is classifier
    for randomised in seen[1:]:
        assert randomised.model is not classifier.model
        assert randomised.target_layer is resolve_layer(randomised.model, "features.3")
        assert randomised.identity != classifier.identity
    assert len({c.identity for c in seen}) == len(seen)
    assert classifier.target_layer is resolve_layer(classifier.model, "features.3")


def test_cascade_is_cumulative_and_cap_is_respected():
    classifier = tiny_classifier(0, SIZE)
    snapshots: list[dict[str, torch.Tensor]] = []

    def explain(c: Classifier) -> np.ndarray:
        snapshots.append({k: v.clone() for k, v in c.model.state_dict().items()})
        return np.arange(SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)

    result = randomisation_check(classifier, explain, layers=2)

    assert [name for name, _ in result.correlations] == LAYERS[:2]
    original, step1, step2 = snapshots
    assert not torch.equal(step1["fc.weight"], original["fc.weight"])
    assert torch.equal(step1["features.2.weight"], original["features.2.weight"])
    assert torch.equal(step2["fc.weight"], step1["fc.weight"])  # stays randomised
    assert not torch.equal(step2["features.2.weight"], original["features.2.weight"])
    assert torch.equal(step2["features.0.weight"], original["features.0.weight"])  # capped


def test_seeded_and_leaves_global_rng_alone():
    classifier = tiny_classifier(0, SIZE)
    explain = gradcam_explainer(smooth_image(SIZE, 2), 5)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = randomisation_check(classifier, explain, seed=7)
    torch.testing.assert_close(torch.rand(3), expected_next)
    second = randomisation_check(classifier, explain, seed=7)
    other = randomisation_check(classifier, explain, seed=8)
    assert first.correlations == second.correlations
    assert first.correlations != other.correlations


def test_constant_maps():
    classifier = tiny_classifier(0, SIZE)
    flat = np.zeros((SIZE, SIZE), dtype=np.float32)
    with pytest.raises(DegenerateMapError):
        randomisation_check(classifier, lambda _c: flat)
    original = np.arange(SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)

    def collapses(c: Classifier) -> np.ndarray:
        return original if c.model is classifier.model else flat

    result = randomisation_check(classifier, collapses)
    # a map that became constant ranks nothing: a flagged failure, never a pass
    assert np.isnan(result.final_correlation)
    assert result.passed is False
    assert result.problem == "map degenerates after randomising fc (constant or non-finite)"
    with pytest.raises(ValueError, match="layers"):
        randomisation_check(classifier, lambda _c: original, layers=0)


class ZeroOnReset(torch.nn.Linear):
    """A linear layer whose re-initialisation zeros it: every gradient map after it vanishes."""

    def reset_parameters(self) -> None:
        torch.nn.init.zeros_(self.weight)
        torch.nn.init.zeros_(self.bias)


def _degenerating_classifier() -> Classifier:
    classifier = tiny_classifier(0, SIZE)
    trained = classifier.model.fc
    classifier.model.fc = ZeroOnReset(trained.in_features, trained.out_features)
    classifier.model.fc.load_state_dict(trained.state_dict())
    return classifier


def test_a_model_whose_map_degenerates_fails_the_check_in_the_study(tmp_path):
    from xai_exp.cache import ExplanationCache
    from xai_exp.config import StudyConfig
    from xai_exp.data.images import ImageItem
    from xai_exp.study.pipeline import Study, run_study

    classifier = _degenerating_classifier()
    explain = gradcam_explainer(smooth_image(SIZE, 0), 3)
    assert np.ptp(explain(classifier)) > 0  # the trained model's map ranks pixels
    result = randomisation_check(classifier, explain, layers=1)
    assert result.passed is False
    assert "map degenerates after randomising fc" in result.problem

    cfg = StudyConfig(progress=False)
    cfg.metrics.sanity = True
    cfg.metrics.sanity_layers = 1
    cfg.method.target_class = 3
    cfg.lime.num_samples = 20
    cfg.lime.segmentation.algorithm = "slic"
    cfg.lime.segmentation.params = {"n_segments": 9, "start_label": 0}
    study = Study(cfg, classifier, ExplanationCache(tmp_path))
    item = ImageItem("a", "a", smooth_image(SIZE, 0), "hash-a", "")
    for _ in range(2):  # computed, then read back from the cache: the same verdict
        [image] = run_study(study, [item], progress=False)
        assert image.values["randomisation_passed"] is False
        assert image.values["randomisation_rho"] is None
        assert "randomisation check failed: map degenerates after randomising fc" in image.reason


class BatchNormAct(torch.nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: a BatchNorm2d with an activation child."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = torch.nn.ReLU()


def test_modules_with_children_are_reset_with_their_running_statistics():
    from xai_exp.evaluate.sanity import _randomise

    norm = BatchNormAct(4)
    with torch.no_grad():
        norm.weight.fill_(3.0)
        norm.running_mean.fill_(5.0)
        norm.running_var.fill_(9.0)
    _randomise(norm)
    assert torch.equal(norm.running_mean, torch.zeros(4))
    assert torch.equal(norm.running_var, torch.ones(4))
    assert torch.equal(norm.weight.detach(), torch.ones(4))
