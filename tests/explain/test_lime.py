"""fast_lime reproduces lime_image's explanation for the same superpixels and seed."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import bn_cnn

from xai_exp.data.images import bundled_images
from xai_exp.explain import lime, superpixels
from xai_exp.models.classifier import fit_to_input, prepare_classifier

SIZE = 48
SAMPLES = 60
TARGET = 3


@pytest.fixture(scope="module")
def classifier():
    labels = [str(i) for i in range(10)]
    return prepare_classifier(
        bn_cnn(), arch="tiny", target_layer="3", input_size=SIZE, labels=labels
    )


@pytest.fixture(scope="module")
def picture():
    image = fit_to_input(bundled_images(1)[0].image, SIZE)
    rows, cols = np.indices((SIZE, SIZE))
    segments = ((rows // 12) * 4 + cols // 12).astype(np.int32)  # 16 superpixels
    return image, segments


def run(function, classifier, picture, **kwargs):
    image, segments = picture
    options = {"num_samples": SAMPLES, "hide_color": None, "seed": 0} | kwargs
    return function(classifier, image, segments, TARGET, **options)


def assert_close(reference: lime.LimeExplanation, ours: lime.LimeExplanation) -> None:
    scale = np.abs(reference.weights).max()
    assert np.abs(ours.weights - reference.weights).max() <= 1e-4 * scale
    assert ours.intercept == pytest.approx(reference.intercept, rel=1e-4, abs=1e-7)
    assert ours.score == pytest.approx(reference.score, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("hide_color", [None, 0])
def test_fast_lime_matches_lime_image(classifier, picture, hide_color):
    reference = run(lime.reference_lime, classifier, picture, hide_color=hide_color)
    ours = run(lime.fast_lime, classifier, picture, hide_color=hide_color)
    assert_close(reference, ours)


def test_fast_lime_matches_with_real_superpixels(classifier, picture):
    image, _ = picture
    segments = superpixels.segment(
        image, "quickshift", {"kernel_size": 4, "max_dist": 200, "ratio": 0.2}
    )
    reference = run(lime.reference_lime, classifier, (image, segments))
    assert_close(reference, run(lime.fast_lime, classifier, (image, segments)))


def test_fast_lime_deterministic_and_batch_size_invariant(classifier, picture):
    first = run(lime.fast_lime, classifier, picture, batch_size=100)
    again = run(lime.fast_lime, classifier, picture, batch_size=100)
    assert np.array_equal(first.weights, again.weights)
    small = run(lime.fast_lime, classifier, picture, batch_size=7)
    assert np.abs(small.weights - first.weights).max() <= 1e-6 * np.abs(first.weights).max()
    other_seed = run(lime.fast_lime, classifier, picture, seed=1)
    assert not np.array_equal(other_seed.weights, first.weights)


def test_perturbed_probabilities_match_lime_images(classifier, picture):
    """The on-device batch equals lime's numpy perturbation, classified one by one."""
    image, segments = picture
    fudged = lime.fudged_image(image, segments, None)
    data = np.random.RandomState(0).randint(0, 2, (9, int(segments.max()) + 1))
    ours = lime.perturbed_probabilities(classifier, image, fudged, segments, data, TARGET, 4)
    predict = classifier.predict
    expected = []
    for row in data:
        temp = image.copy()
        hidden = np.isin(segments, np.flatnonzero(row == 0))
        temp[hidden] = fudged[hidden]
        expected.append(predict(temp[None])[0, TARGET])
    assert np.allclose(ours, expected, rtol=1e-5, atol=1e-7)


def test_fast_lime_bf16_runs(classifier, picture):
    ours = run(lime.fast_lime, classifier, picture, precision="bf16")
    assert ours.weights.shape == (16,)
    assert np.isfinite(ours.weights).all()
