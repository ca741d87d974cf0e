"""Deletion / insertion curves: ordering on a model with a known receptive patch, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import smooth_image, tiny_classifier
from torch import nn

from xai_exp.evaluate.faithfulness import (
    FaithfulnessCurves,
    baseline_image,
    deletion_insertion,
    normalise_float_image,
)
from xai_exp.evaluate.masks import DegenerateMapError, lime_weight_map
from xai_exp.models import inference
from xai_exp.models.classifier import Classifier, prepare_classifier
from xai_exp.outputs.plots import curve_plot

SIZE = 16
PATCH = (slice(4, 8), slice(8, 12))  # the only pixels the patch model reads


class PatchModel(nn.Module):
    """Class-0 logit grows with the brightness of one 4x4 patch; class-1 logit is 0."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Identity()  # a stand-in target layer
        mask = torch.zeros(1, 3, SIZE, SIZE)
        mask[:, :, PATCH[0], PATCH[1]] = 1.0
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patch = (self.body(x) * self.mask).sum(dim=(1, 2, 3))  # 0..48 on [0, 1] pixels
        logit = 0.5 * (patch - 24.0)
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


def patch_classifier() -> Classifier:
    return prepare_classifier(
        PatchModel(),
        arch="patch",
        target_layer="body",
        input_size=SIZE,
        labels=["patch", "other"],
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    )


def patch_image() -> np.ndarray:
    """Dark, faintly textured background; the model's patch is white."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 30, size=(SIZE, SIZE, 3), dtype=np.uint8)
    image[PATCH[0], PATCH[1]] = 255
    return image


def patch_maps() -> dict[str, np.ndarray]:
    exact = np.zeros((SIZE, SIZE), dtype=np.float32)
    exact[PATCH[0], PATCH[1]] = 1.0
    exact += np.linspace(0, 0.1, SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)
    random = np.random.default_rng(3).random((SIZE, SIZE)).astype(np.float32)
    return {"exact": exact, "random": random, "inverted": -exact}


@pytest.mark.parametrize("baseline", ["black", "mean", "blur"])
def test_true_patch_map_is_most_faithful(baseline):
    classifier = patch_classifier()
    curves = {
        name: deletion_insertion(
            classifier, patch_image(), saliency, 0, steps=16, baseline=baseline
        )
        for name, saliency in patch_maps().items()
    }
    deletion = {name: c.deletion_auc for name, c in curves.items()}
    insertion = {name: c.insertion_auc for name, c in curves.items()}
    assert deletion["exact"] < deletion["random"] < deletion["inverted"]
    assert insertion["exact"] > insertion["random"] > insertion["inverted"]
    if baseline == "black":
        # 16 steps of 16 pixels: the first step deletes (inserts) exactly the patch.
        exact = curves["exact"]
        assert exact.deletion[0] > 0.99
        assert exact.deletion[1:].max() < 0.01
        assert exact.insertion[0] < 0.01
        assert exact.insertion[1:].min() > 0.99


def test_lime_weight_map_works_as_saliency():
    classifier = patch_classifier()
    rows, cols = np.indices((SIZE, SIZE)) // 4
    segments = (rows * 4 + cols).astype(np.int32)
    weights = np.zeros(16)
    weights[1 * 4 + 2] = 1.0  # the superpixel that is the patch
    weights[0] = 0.5
    saliency = lime_weight_map(segments, weights)
    curves = deletion_insertion(classifier, patch_image(), saliency, 0, steps=16, baseline="black")
    assert curves.deletion_auc < 0.1
    assert curves.insertion_auc > 0.9


def test_endpoints_steps_and_fractions():
    classifier = tiny_classifier(0, size=SIZE)
    view = smooth_image(SIZE, 1)
    saliency = np.random.default_rng(0).random((SIZE, SIZE)).astype(np.float32)
    curves = deletion_insertion(classifier, view, saliency, 2, steps=7, baseline="mean")

    assert curves.fractions.shape == curves.deletion.shape == curves.insertion.shape == (8,)
    assert curves.fractions[0] == 0.0
    assert curves.fractions[-1] == 1.0
    assert np.all(np.diff(curves.fractions) > 0)
    with torch.inference_mode():
        original = classifier.model(classifier.input_tensor(view)).softmax(-1)[0, 2].item()
        base = normalise_float_image(classifier, baseline_image(view, "mean"))
        baseline = classifier.model(base).softmax(-1)[0, 2].item()
    assert curves.deletion[0] == pytest.approx(original, abs=1e-6)
    assert curves.insertion[-1] == pytest.approx(original, abs=1e-6)
    assert curves.deletion[-1] == pytest.approx(baseline, abs=1e-6)
    assert curves.insertion[0] == pytest.approx(baseline, abs=1e-6)
    assert 0.0 <= curves.deletion_auc <= 1.0
    assert 0.0 <= curves.insertion_auc <= 1.0


def test_batch_size_does_not_change_curves_and_bounds_batches():
    classifier = tiny_classifier(1, size=SIZE)
    view = smooth_image(SIZE, 2)
    saliency = np.random.default_rng(1).random((SIZE, SIZE)).astype(np.float32)
    seen: list[int] = []
    inference.prepare_for_inference(classifier, "torch")
    network = inference.inference_network(classifier)  # what runs the forward passes
    hook = network.register_forward_hook(lambda _m, args, _o: seen.append(len(args[0])))
    try:
        results = {
            batch: deletion_insertion(classifier, view, saliency, 4, steps=10, batch_size=batch)
            for batch in (1, 5, 32)
        }
    finally:
        hook.remove()
    assert seen[:22] == [1] * 22
    assert seen[22:27] == [5, 5, 5, 5, 2]
    assert seen[27:] == [22]
    for batch in (5, 32):
        np.testing.assert_allclose(results[batch].deletion, results[1].deletion, atol=1e-6)
        np.testing.assert_allclose(results[batch].insertion, results[1].insertion, atol=1e-6)


def test_ties_are_broken_deterministically_in_row_major_order():
    classifier = patch_classifier()
    image = patch_image()
    tied = np.zeros((SIZE, SIZE), dtype=np.float32)
    tied[PATCH[0], PATCH[1]] = 1.0  # background all tied
    first = deletion_insertion(classifier, image, tied, 0, steps=8, baseline="black")
    second = deletion_insertion(classifier, image, tied, 0, steps=8, baseline="black")
    np.testing.assert_array_equal(first.deletion, second.deletion)


def test_invalid_inputs():
    classifier = patch_classifier()
    image = patch_image()
    with pytest.raises(DegenerateMapError):
        deletion_insertion(classifier, image, np.ones((SIZE, SIZE)), 0)
    with pytest.raises(ValueError, match="shape"):
        deletion_insertion(classifier, image, np.ones((SIZE, SIZE - 1)), 0)
    with pytest.raises(ValueError, match="baseline"):
        deletion_insertion(classifier, image, patch_maps()["exact"], 0, baseline="noise")


def test_baselines():
    view = smooth_image(SIZE, 0)
    assert not baseline_image(view, "black").any()
    mean = baseline_image(view, "mean")
    np.testing.assert_allclose(mean[3, 5], view.reshape(-1, 3).mean(axis=0), rtol=1e-5)
    blur = baseline_image(view, "blur")
    assert blur.shape == view.shape
    assert blur.dtype == np.float32
    assert blur.std() < view.astype(np.float32).std()
    assert blur.min() >= 0.0
    assert blur.max() <= 255.0


def test_normalised_float_image_matches_input_tensor():
    classifier = tiny_classifier(0, size=SIZE)
    view = smooth_image(SIZE, 3)
    torch.testing.assert_close(
        normalise_float_image(classifier, view.astype(np.float32)), classifier.input_tensor(view)
    )


def test_curve_plot_draws_mean_curves(tmp_path):
    fractions = np.linspace(0, 1, 5)
    one = FaithfulnessCurves(fractions, np.linspace(1, 0, 5), np.linspace(0, 1, 5), 0.5, 0.5)
    two = FaithfulnessCurves(fractions, np.zeros(5), np.ones(5), 0.0, 1.0)
    figure = curve_plot({"gradcam": [one, two], "lime": one})
    deletion_axis, insertion_axis = figure.axes
    assert len(deletion_axis.lines) == len(insertion_axis.lines) == 2
    np.testing.assert_allclose(deletion_axis.lines[0].get_ydata(), np.linspace(0.5, 0, 5))
    assert "gradcam" in deletion_axis.get_legend().get_texts()[0].get_text()
    figure.savefig(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


# --------------------------------------------------------------------------- RISE's protocol


def _rise_by_hand(classifier: Classifier, view: np.ndarray, saliency: np.ndarray, target: int):
    """RISE's CausalMetric, step by step: one image per step, edited in place."""
    from scipy.ndimage import gaussian_filter
    from scipy.signal import correlate2d

    image = normalise_float_image(classifier, view.astype(np.float32))[0].numpy()  # 3xHxW
    channels, height, width = image.shape
    pixels, step = height * width, width
    steps = (pixels + step - 1) // step
    dirac = np.zeros((11, 11))
    dirac[5, 5] = 1.0
    kernel = gaussian_filter(dirac, 5.0)
    blurred = np.stack([correlate2d(c, kernel, mode="same", boundary="fill") for c in image])
    order = np.flip(np.argsort(saliency.reshape(-1)))

    def curve(start: np.ndarray, finish: np.ndarray) -> np.ndarray:
        start = start.reshape(channels, pixels).copy()
        finish = finish.reshape(channels, pixels)
        scores = []
        for i in range(steps + 1):
            batch = torch.from_numpy(start.reshape(1, channels, height, width).astype(np.float32))
            with torch.no_grad():
                scores.append(float(classifier.model(batch).softmax(dim=-1)[0, target]))
            coords = order[step * i : step * (i + 1)]
            start[:, coords] = finish[:, coords]
        return np.array(scores)

    deletion = curve(image, np.zeros_like(image))
    insertion = curve(blurred, image)

    def area(scores: np.ndarray) -> float:
        return (scores.sum() - scores[0] / 2 - scores[-1] / 2) / (len(scores) - 1)

    return deletion, insertion, area(deletion), area(insertion)


@pytest.mark.parametrize("name", ["exact", "random"])
def test_rise_protocol_equals_rises_step_by_step_evaluation(name):
    classifier = patch_classifier()
    view, saliency = patch_image(), patch_maps()[name]
    deletion, insertion, deletion_auc, insertion_auc = _rise_by_hand(classifier, view, saliency, 0)
    found = deletion_insertion(classifier, view, saliency, 0, protocol="rise", batch_size=7)
    assert len(found.deletion) == SIZE + 1  # one pixel row per step
    np.testing.assert_allclose(found.deletion, deletion, atol=1e-6)
    np.testing.assert_allclose(found.insertion, insertion, atol=1e-6)
    assert found.deletion_auc == pytest.approx(deletion_auc, abs=1e-6)
    assert found.insertion_auc == pytest.approx(insertion_auc, abs=1e-6)
    other = deletion_insertion(classifier, view, saliency, 0, steps=SIZE, baseline="black")
    assert not np.allclose(other.insertion, found.insertion)  # not the xai_exp protocol
