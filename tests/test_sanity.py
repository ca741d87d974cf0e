"""Cascading model-parameter randomisation check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import smooth_image, tiny_classifier

from xai_exp.explainers.cam import compute_cam
from xai_exp.masks import DegenerateMapError
from xai_exp.models import Classifier, resolve_layer
from xai_exp.sanity import parameterised_layers, randomisation_check

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
    assert result.final_correlation == 0.0
    assert result.passed is True
    with pytest.raises(ValueError, match="layers"):
        randomisation_check(classifier, lambda _c: original, layers=0)
