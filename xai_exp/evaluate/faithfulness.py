"""Deletion and insertion curves (Petsiuk et al., RISE): does the saliency order matter?

Deletion replaces the most salient pixels of the image by a substrate; insertion reveals them on
a substrate. At each point the target-class softmax probability is recorded. A faithful map
gives a low deletion AUC and a high insertion AUC. Two protocols:

- ``xai_exp`` (default, cheap): pixels ranked by decreasing saliency (stable sort, ties in
  row-major order), `steps + 1` points from 0% to 100% in equal chunks, one baseline for both
  curves (`baseline_image`: black is pixel value 0), trapezoid AUC over the fractions.
- ``rise``: RISE's own evaluation (``CausalMetric`` in the authors' code): one row of pixels
  (the input width, 224 at 224 px) per step; deletion to zero in the model's normalised input
  space; insertion from the normalised image blurred by an 11x11 Gaussian kernel of sigma 5
  (zero padded); RISE's pixel order (``argsort`` reversed) and AUC. Use it to set numbers beside
  published ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional

from xai_exp.config import BASELINES, FAITHFULNESS_PROTOCOLS
from xai_exp.evaluate.agreement import curve_area
from xai_exp.evaluate.masks import check_map
from xai_exp.models import inference
from xai_exp.models.classifier import Classifier


@dataclass
class FaithfulnessCurves:
    """Target-class probability versus fraction of pixels deleted / inserted; AUCs in [0, 1]."""

    fractions: np.ndarray  # steps + 1 values from 0 to 1: exact share of pixels changed
    deletion: np.ndarray
    insertion: np.ndarray
    deletion_auc: float
    insertion_auc: float

    @classmethod
    def from_scores(
        cls, fractions: np.ndarray, deletion: np.ndarray, insertion: np.ndarray, protocol: str
    ) -> FaithfulnessCurves:
        """The curves with their AUCs as the protocol defines them."""
        area = rise_auc if protocol == "rise" else (lambda scores: curve_area(fractions, scores))
        return cls(fractions, deletion, insertion, area(deletion), area(insertion))


PROTOCOLS = FAITHFULNESS_PROTOCOLS
RISE_KERNEL_SIZE = 11
RISE_KERNEL_SIGMA = 5.0


def rise_auc(scores: np.ndarray) -> float:
    """RISE's normalised area: the trapezoid rule over equally spaced steps."""
    scores = np.asarray(scores, dtype=float)
    return float((scores.sum() - scores[0] / 2 - scores[-1] / 2) / (len(scores) - 1))


def rise_blur_kernel() -> torch.Tensor:
    """RISE's 3x3x11x11 blur kernel: a Dirac smoothed by scipy's gaussian_filter (sigma 5),
    one per channel."""
    from scipy.ndimage import gaussian_filter

    dirac = np.zeros((RISE_KERNEL_SIZE, RISE_KERNEL_SIZE))
    dirac[RISE_KERNEL_SIZE // 2, RISE_KERNEL_SIZE // 2] = 1.0
    smooth = gaussian_filter(dirac, RISE_KERNEL_SIGMA)
    kernel = np.zeros((3, 3, RISE_KERNEL_SIZE, RISE_KERNEL_SIZE))
    for channel in range(3):
        kernel[channel, channel] = smooth
    return torch.from_numpy(kernel.astype(np.float32))


def baseline_image(view: np.ndarray, baseline: str = "blur") -> np.ndarray:
    """HxWx3 float32 image in [0, 255] that deleted pixels take: black, channel mean, or blur.

    The blur is a gaussian with sigma = max(H, W) / 20 (per channel).
    """
    image = np.asarray(view, dtype=np.float32)
    if baseline == "black":
        return np.zeros_like(image)
    if baseline == "mean":
        return np.broadcast_to(image.mean(axis=(0, 1), dtype=np.float64), image.shape).astype(
            np.float32
        )
    if baseline == "blur":
        from skimage.filters import gaussian

        sigma = max(image.shape[:2]) / 20.0
        blurred = gaussian(image, sigma=sigma, channel_axis=-1, preserve_range=True)
        return np.asarray(blurred, dtype=np.float32)
    raise ValueError(f"baseline must be one of {', '.join(BASELINES)}; got {baseline!r}")


def normalise_float_image(classifier: Classifier, image: np.ndarray) -> torch.Tensor:
    """HxWx3 float image in [0, 255] to the model's normalised 1x3xHxW input (as input_tensor)."""
    return classifier.normalised_pixels(np.asarray(image, dtype=np.float32)).permute(0, 3, 1, 2)


def deletion_insertion(
    classifier: Classifier,
    view_uint8: np.ndarray,
    saliency: np.ndarray,
    target_class: int,
    steps: int = 20,
    baseline: str = "blur",
    batch_size: int = 32,
    protocol: str = "xai_exp",
) -> FaithfulnessCurves:
    """Deletion and insertion curves of one saliency map (CAM map or LIME weight map).

    ``xai_exp``: step k changes the round(k * pixels / steps) most salient pixels towards
    `baseline`. ``rise``: RISE's protocol (see the module docstring; `steps` and `baseline` are
    not used). All images are classified in forward passes of at most `batch_size`. A constant
    or non-finite map raises DegenerateMapError (it defines no order).
    """
    if view_uint8.ndim != 3 or view_uint8.shape[2] != 3:
        raise ValueError(f"view must be HxWx3, got shape {view_uint8.shape}")
    if saliency.shape != view_uint8.shape[:2]:
        raise ValueError(f"saliency shape {saliency.shape} != view shape {view_uint8.shape[:2]}")
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be at least 1")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")
    check_map(saliency, "saliency map")
    height, width = saliency.shape
    pixels = height * width
    flat = np.asarray(saliency, dtype=np.float64).ravel()
    device = classifier.device
    original = normalise_float_image(classifier, np.asarray(view_uint8, dtype=np.float32))
    if protocol == "rise":
        order = np.flip(np.argsort(flat))  # RISE's order, ties included
        points = -(-pixels // width)  # steps of one pixel row
        counts = np.minimum(np.arange(points + 1) * width, pixels)
        deleted = torch.zeros_like(original)  # zero in normalised space
        kernel = rise_blur_kernel().to(device=device, dtype=original.dtype)
        with torch.inference_mode():
            blurred = functional.conv2d(original, kernel, padding=RISE_KERNEL_SIZE // 2)
        substrates = (deleted, blurred)
    else:
        order = np.argsort(-flat, kind="stable")
        counts = np.round(np.arange(steps + 1) * pixels / steps).astype(np.int64)
        base = normalise_float_image(classifier, baseline_image(view_uint8, baseline))
        substrates = (base, base)
    rank = np.empty(pixels, dtype=np.int64)
    rank[order] = np.arange(pixels)
    rank_t = torch.from_numpy(rank.reshape(1, 1, height, width)).to(device)
    points = len(counts)
    # Row i < points is deletion step i; row points + i is insertion step i.
    thresholds = torch.from_numpy(np.concatenate([counts, counts])).to(device)
    deleting = torch.arange(2 * points, device=device) < points
    probabilities = []
    with torch.inference_mode():
        for start in range(0, len(thresholds), batch_size):
            stop = start + batch_size
            changed = rank_t < thresholds[start:stop].view(-1, 1, 1, 1)  # Bx1xHxW
            deletes = deleting[start:stop].view(-1, 1, 1, 1)
            keep_original = changed ^ deletes
            substrate = torch.where(deletes, substrates[0], substrates[1])
            batch = torch.where(keep_original, original, substrate)
            logits = inference.forward_logits(classifier, batch, "fp32")
            probabilities.append(logits.softmax(dim=-1)[:, target_class].cpu())
    scores = torch.cat(probabilities).double().numpy()
    return FaithfulnessCurves.from_scores(
        counts / pixels, scores[:points], scores[points:], protocol
    )
