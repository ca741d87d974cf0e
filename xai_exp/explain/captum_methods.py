"""KernelSHAP, Occlusion and Integrated Gradients: Captum's implementations, run on our classifier.

Captum's classes are the reference implementations; this module only supplies what they call.
All three explain the softmax probability of the target class, as LIME does (and RISE), so the
maps of every explainer share one unit: KernelSHAP weights and Integrated Gradients sum to
P(target | view) - P(target | baseline), an Occlusion value is the mean drop in that
probability when the pixel is hidden.

Baselines live in the model's normalised input space: a float `baseline` 0 is the dataset mean
colour (``classifier.mean``), as Score-CAM's masked pixels are. KernelSHAP's baseline is LIME's
hidden superpixel instead (`lime.fudged_image`: each superpixel's mean colour, or `hide_color`),
so the two explain the same perturbations of the same superpixels. Pixel maps are summed over
the three colour channels (Captum's attribution is per channel; the sum keeps completeness).

The forward-only methods (KernelSHAP, Occlusion) give Captum a forward function that runs through
`xai_exp.models.inference.forward_logits`, the engine LIME's fast path uses (ONNX Runtime or the
BN-folded channels_last copy, as `prepare_for_inference` chose); Integrated Gradients needs
gradients, so it runs `classifier.model` itself in fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

from xai_exp.explain.lime import fudged_image
from xai_exp.models import inference
from xai_exp.models.classifier import Classifier


def _check_view(view: np.ndarray) -> None:
    if view.ndim != 3 or view.shape[2] != 3:
        raise ValueError(f"view must be an H x W x 3 RGB image, not shape {view.shape}")


def _check_target(classifier: Classifier, target: int) -> None:
    classes = len(classifier.labels)
    if target < 0 or (classes and target >= classes):
        raise ValueError(
            f"target={target} is not a class index of {classifier.arch} (0..{classes - 1})"
        )


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, not {value}")


def engine_probabilities(
    classifier: Classifier, precision: str = "fp32"
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Captum's forward function: softmax probabilities of a normalised NCHW batch through
    `inference.forward_logits` (an ordinary tensor, not an inference-mode one)."""

    def forward(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            probabilities = inference.forward_logits(classifier, batch, precision).softmax(dim=-1)
        return probabilities.clone()

    return forward


def model_probabilities(classifier: Classifier) -> Callable[[torch.Tensor], torch.Tensor]:
    """Softmax probabilities of `classifier.model` itself (differentiable, fp32)."""

    def forward(batch: torch.Tensor) -> torch.Tensor:
        return classifier.model(batch).float().softmax(dim=-1)

    return forward


@contextmanager
def seeded_torch(seed: int, device: torch.device) -> Iterator[None]:
    """torch's global RNG seeded with `seed` inside, restored afterwards (Captum draws from it)."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def kernel_shap(
    classifier: Classifier,
    view: np.ndarray,
    segments: np.ndarray,
    target: int,
    *,
    num_samples: int,
    hide_color: int | None,
    seed: int,
    batch_size: int,
    precision: str = "fp32",
) -> np.ndarray:
    """KernelSHAP weight of each superpixel (length n) for P(target), by `captum.attr.KernelShap`.

    `segments` (H x W ids 0..n-1) are the superpixels LIME uses; a hidden superpixel shows what
    LIME shows (`lime.fudged_image(view, segments, hide_color)`, normalised like the input).
    Captum draws its coalitions from torch's global RNG: they are drawn under `seed` and the
    caller's RNG state is restored afterwards. `batch_size` coalitions are evaluated per call.
    """
    from captum.attr import KernelShap

    _check_view(view)
    _check_target(classifier, target)
    _check_positive(num_samples=num_samples, batch_size=batch_size)
    if segments.shape != view.shape[:2]:
        raise ValueError(f"segments {segments.shape} do not match the view {view.shape[:2]}")
    if segments.min() < 0:
        raise ValueError("segments must be superpixel ids 0..n-1")
    # NCHW-contiguous: Captum builds each perturbed input ~3x faster than from channels_last
    inputs = classifier.input_tensor(view).contiguous()
    baselines = classifier.input_tensor(fudged_image(view, segments, hide_color)).contiguous()
    mask = torch.from_numpy(segments.astype(np.int64)).to(classifier.device)[None, None]
    with seeded_torch(seed, classifier.device):
        weights = KernelShap(engine_probabilities(classifier, precision)).attribute(
            inputs,
            baselines=baselines,
            target=target,
            feature_mask=mask,
            n_samples=num_samples,
            perturbations_per_eval=batch_size,
            return_input_shape=False,
        )
    return weights.detach().reshape(-1).cpu().numpy().astype(np.float64)


def occlusion(
    classifier: Classifier,
    view: np.ndarray,
    target: int,
    *,
    window: int,
    stride: int,
    baseline: float,
    batch_size: int,
    precision: str = "fp32",
) -> np.ndarray:
    """Occlusion map (H x W float32) for P(target), by `captum.attr.Occlusion`.

    A `window` x `window` patch of all three channels, moved by `stride`, is set to `baseline`
    (normalised space: 0 is the dataset mean colour); a pixel's value is the mean drop in the
    target probability over the patches covering it, summed over the channels. `batch_size`
    occluded images are classified per call.
    """
    from captum.attr import Occlusion

    _check_view(view)
    _check_target(classifier, target)
    _check_positive(window=window, stride=stride, batch_size=batch_size)
    if window > min(view.shape[:2]):
        raise ValueError(f"window={window} is larger than the view {view.shape[:2]}")
    inputs = classifier.input_tensor(view).contiguous()  # as in kernel_shap
    attributions = Occlusion(engine_probabilities(classifier, precision)).attribute(
        inputs,
        sliding_window_shapes=(3, window, window),
        strides=(3, stride, stride),
        baselines=float(baseline),
        target=target,
        perturbations_per_eval=batch_size,
    )
    return attributions.detach()[0].sum(dim=0).cpu().numpy().astype(np.float32)


def integrated_gradients(
    classifier: Classifier,
    view: np.ndarray,
    target: int,
    *,
    steps: int,
    baseline: float,
    batch_size: int,
) -> np.ndarray:
    """Integrated Gradients (H x W float32) of P(target), by `captum.attr.IntegratedGradients`.

    Straight path from a constant `baseline` image (normalised space: 0 is the dataset mean
    colour) to the view, `steps` Gauss-Legendre points (Captum's default method), `batch_size`
    points per backward pass; summed over the channels. Runs `classifier.model` in fp32.
    """
    from captum.attr import IntegratedGradients

    _check_view(view)
    _check_target(classifier, target)
    _check_positive(steps=steps, batch_size=batch_size)
    inputs = classifier.input_tensor(view)
    with torch.enable_grad():
        attributions = IntegratedGradients(model_probabilities(classifier)).attribute(
            inputs,
            baselines=float(baseline),
            target=target,
            n_steps=steps,
            method="gausslegendre",
            internal_batch_size=batch_size,
        )
    return attributions.detach()[0].sum(dim=0).cpu().numpy().astype(np.float32)
