"""KernelSHAP, Occlusion and Integrated Gradients equal Captum's own classes; RISE equals its
one-mask-at-a-time reference; toy models check that the maps point where the evidence is."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny_models import bn_cnn
from torch import nn

from xai_exp.data.images import bundled_images
from xai_exp.explain import captum_methods, lime, rise
from xai_exp.models import inference
from xai_exp.models.classifier import fit_to_input, prepare_classifier

SIZE = 32
TARGET = 3
LABELS = [str(i) for i in range(10)]


def close(ours: np.ndarray, reference: np.ndarray, rtol: float = 1e-5) -> float:
    """Largest difference relative to the reference's largest magnitude (asserted <= rtol)."""
    assert ours.shape == reference.shape
    assert ours.dtype == reference.dtype
    scale = float(np.abs(reference).max())
    assert scale > 0
    error = float(np.abs(ours - reference).max()) / scale
    assert error <= rtol, error
    return error


@pytest.fixture(scope="module", params=["torch", "auto"])
def classifier(request):
    """The BN tiny CNN with the forward engine prepared as a study prepares it (`auto` is ONNX
    Runtime on a CPU)."""
    net = prepare_classifier(
        bn_cnn(), arch="tiny", target_layer="3", input_size=SIZE, labels=LABELS
    )
    inference.prepare_for_inference(net, request.param)
    return net


@pytest.fixture(scope="module")
def view():
    return fit_to_input(bundled_images(1)[0].image, SIZE)


@pytest.fixture(scope="module")
def segments():
    rows, cols = np.indices((SIZE, SIZE))
    return ((rows // 8) * 4 + cols // 8).astype(np.int32)  # 16 superpixels


def probabilities_of(model: nn.Module):
    return lambda batch: model(batch).softmax(dim=-1)


@pytest.mark.parametrize("hide_color", [None, 0])
def test_kernel_shap_equals_captum(classifier, view, segments, hide_color):
    from captum.attr import KernelShap

    options = {"num_samples": 60, "hide_color": hide_color, "seed": 5}
    ours = captum_methods.kernel_shap(classifier, view, segments, TARGET, batch_size=16, **options)
    inputs = classifier.input_tensor(view)
    baselines = classifier.input_tensor(lime.fudged_image(view, segments, hide_color))
    mask = torch.from_numpy(segments.astype(np.int64))[None, None]
    with torch.random.fork_rng():
        torch.manual_seed(5)
        reference = KernelShap(probabilities_of(classifier.model)).attribute(
            inputs, baselines=baselines, target=TARGET, feature_mask=mask, n_samples=60
        )
    # with the input's shape, each superpixel's pixels hold its weight
    expected = np.array([float(reference[0, 0][segments == i][0]) for i in range(16)])
    assert ours.shape == (16,)
    close(ours, expected, 1e-4)  # a least-squares fit of probabilities amplifies their rounding


def test_kernel_shap_seed_is_reproducible_and_leaves_global_rng(classifier, view, segments):
    options = {"num_samples": 40, "hide_color": None, "batch_size": 7}
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = captum_methods.kernel_shap(classifier, view, segments, TARGET, seed=1, **options)
    assert torch.equal(torch.get_rng_state(), before)
    again = captum_methods.kernel_shap(classifier, view, segments, TARGET, seed=1, **options)
    np.testing.assert_array_equal(first, again)
    other = captum_methods.kernel_shap(classifier, view, segments, TARGET, seed=2, **options)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize(("window", "stride", "baseline"), [(8, 4, 0.0), (5, 3, -1.0)])
def test_occlusion_equals_captum(classifier, view, window, stride, baseline):
    from captum.attr import Occlusion

    ours = captum_methods.occlusion(
        classifier, view, TARGET, window=window, stride=stride, baseline=baseline, batch_size=16
    )
    reference = Occlusion(probabilities_of(classifier.model)).attribute(
        classifier.input_tensor(view),
        sliding_window_shapes=(3, window, window),
        strides=(3, stride, stride),
        baselines=baseline,
        target=TARGET,
    )
    # Captum itself differs by 2.4e-5 of the map's largest value between perturbations_per_eval 1
    # and 16 here: a value is a difference of two float32 probabilities (~0.1) about 1e-3 apart
    close(ours, reference[0].sum(dim=0).numpy(), 1e-4)


def test_integrated_gradients_equals_captum(classifier, view):
    from captum.attr import IntegratedGradients

    ours = captum_methods.integrated_gradients(
        classifier, view, TARGET, steps=12, baseline=0.0, batch_size=5
    )
    reference = IntegratedGradients(probabilities_of(classifier.model)).attribute(
        classifier.input_tensor(view), baselines=0.0, target=TARGET, n_steps=12
    )
    close(ours, reference[0].sum(dim=0).detach().numpy())
    assert ours.shape == (SIZE, SIZE)
    assert ours.dtype == np.float32


RISE = {"num_masks": 40, "grid_size": 4, "keep_probability": 0.5}


def test_rise_equals_reference_at_any_batch_size(classifier, view):
    reference = rise.rise_reference(classifier, view, TARGET, seed=3, **RISE)
    for batch_size in (16, 7):
        ours = rise.rise(classifier, view, TARGET, seed=3, batch_size=batch_size, **RISE)
        close(ours, reference)
    other = rise.rise(classifier, view, TARGET, seed=4, batch_size=16, **RISE)
    assert not np.allclose(other, reference, rtol=1e-3, atol=0)


def test_rise_masks_follow_the_paper():
    """Values in [0, 1], mean about p, not constant per cell (random shifts), and the grids are
    the same whatever slice of them is made."""
    draws = rise.draw_masks(0, 200, 5, 0.3, 30, 20)
    masks = rise.make_masks(draws, 0, 200, 30, 20, torch.device("cpu"))
    assert masks.shape == (200, 30, 20)
    assert float(masks.min()) >= 0.0
    assert float(masks.max()) <= 1.0 + 1e-6  # bilinear weights sum to 1 up to rounding
    assert abs(float(masks.mean()) - 0.3) < 0.05
    assert set(np.unique(draws.shifts[:, 0])) == set(range(6))  # ceil(30 / 5)
    assert set(np.unique(draws.shifts[:, 1])) == set(range(4))  # ceil(20 / 5)
    torch.testing.assert_close(
        rise.make_masks(draws, 50, 60, 30, 20, torch.device("cpu")), masks[50:60]
    )


# ------------------------------------------------------------------------- toy sanity checks


class QuadrantModel(nn.Module):
    """Two classes; class 0's logit is 4x the mean of the top-left quadrant of the input."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        h, w = features.shape[-2] // 2, features.shape[-1] // 2
        logit = 4.0 * features[:, :, :h, :w].mean(dim=(1, 2, 3))
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


@pytest.fixture(scope="module")
def toy():
    return prepare_classifier(
        QuadrantModel(),
        arch="quadrant",
        target_layer="features",
        input_size=SIZE,
        labels=["a", "b"],
    )


@pytest.fixture(scope="module")
def bright():
    """A bright image (positive in normalised space) with some texture."""
    rng = np.random.default_rng(0)
    return rng.integers(200, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def top_left_wins(saliency: np.ndarray) -> None:
    half = SIZE // 2
    inside = saliency[:half, :half]
    outside = np.concatenate([saliency[half:].ravel(), saliency[:half, half:].ravel()])
    assert inside.mean() > 2 * abs(outside.mean()) + 1e-6
    row, col = np.unravel_index(saliency.argmax(), saliency.shape)
    assert row < half
    assert col < half


def test_rise_finds_the_quadrant(toy, bright):
    saliency = rise.rise(
        toy, bright, 0, num_masks=200, grid_size=4, keep_probability=0.5, seed=0, batch_size=50
    )
    top_left_wins(saliency - saliency.mean())


def test_occlusion_finds_the_quadrant(toy, bright):
    saliency = captum_methods.occlusion(
        toy, bright, 0, window=4, stride=4, baseline=0.0, batch_size=32
    )
    top_left_wins(saliency)
    assert np.abs(saliency[SIZE // 2 :]).max() == 0.0  # hiding elsewhere changes nothing


def test_integrated_gradients_finds_the_quadrant(toy, bright):
    saliency = captum_methods.integrated_gradients(
        toy, bright, 0, steps=16, baseline=0.0, batch_size=8
    )
    top_left_wins(saliency)
    # completeness: the map sums to P(a | image) - P(a | mean colour)
    probability = toy.predict(bright)[0, 0]
    assert saliency.sum() == pytest.approx(probability - 0.5, rel=1e-3)


# ------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_masks": 0}, "num_masks"),
        ({"keep_probability": 0.0}, "keep_probability"),
        ({"keep_probability": 1.5}, "keep_probability"),
        ({"grid_size": 0}, "grid_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"target": 2}, "target"),
    ],
)
def test_rise_rejects_bad_arguments(toy, bright, overrides, message):
    options = {"target": 0, "seed": 0, "batch_size": 4, **RISE} | overrides
    with pytest.raises(ValueError, match=message):
        rise.rise(toy, bright, **options)


@pytest.mark.parametrize(
    ("function", "overrides", "message"),
    [
        ("occlusion", {"window": 0}, "window"),
        ("occlusion", {"stride": 0}, "stride"),
        ("occlusion", {"window": SIZE + 1}, "window"),
        ("occlusion", {"batch_size": 0}, "batch_size"),
        ("integrated_gradients", {"steps": 0}, "steps"),
        ("integrated_gradients", {"target": -1}, "target"),
        ("kernel_shap", {"num_samples": 0}, "num_samples"),
        ("kernel_shap", {"segments": np.zeros((4, 4), np.int32)}, "segments"),
    ],
)
def test_captum_methods_reject_bad_arguments(toy, bright, function, overrides, message):
    defaults = {
        "occlusion": {"window": 4, "stride": 2, "baseline": 0.0, "batch_size": 4},
        "integrated_gradients": {"steps": 4, "baseline": 0.0, "batch_size": 4},
        "kernel_shap": {
            "segments": np.zeros((SIZE, SIZE), np.int32),
            "num_samples": 10,
            "hide_color": None,
            "seed": 0,
            "batch_size": 4,
        },
    }
    options = {"target": 0, **defaults[function]} | overrides
    with pytest.raises(ValueError, match=message):
        getattr(captum_methods, function)(toy, bright, **options)


def test_new_explainers_import_neither_mlflow_hydra_nor_captum():
    """Like the rest of the explanation core (test_layering); Captum loads when one runs."""
    code = (
        "import sys\n"
        "import xai_exp.explain.captum_methods, xai_exp.explain.rise\n"
        "print(sorted(m for m in ('mlflow', 'hydra', 'captum') if m in sys.modules))\n"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert found.strip() == "[]"
