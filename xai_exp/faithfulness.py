"""Deletion and insertion curves (Petsiuk et al., RISE): does the saliency order matter?

Pixels are ranked by decreasing saliency (stable sort, so ties go in row-major order). Deletion
replaces the top-ranked pixels of the image by a baseline; insertion reveals them on the baseline.
At each of `steps + 1` points (0%..100% of the pixels, in equal chunks) the target-class softmax
probability is recorded. A faithful map gives a low deletion AUC and a high insertion AUC.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from xai_exp.agreement import curve_area
from xai_exp.config import BASELINES
from xai_exp.masks import check_map
from xai_exp.models import Classifier


@dataclass
class FaithfulnessCurves:
    """Target-class probability versus fraction of pixels deleted / inserted; AUCs in [0, 1]."""

    fractions: np.ndarray  # steps + 1 values from 0 to 1: exact share of pixels changed
    deletion: np.ndarray
    insertion: np.ndarray
    deletion_auc: float
    insertion_auc: float


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
) -> FaithfulnessCurves:
    """Deletion and insertion curves of one saliency map (CAM map or LIME weight map).

    Step k changes the round(k * pixels / steps) most salient pixels; all 2 * (steps + 1)
    images are classified in forward passes of at most `batch_size`. A constant or non-finite
    map raises DegenerateMapError (it defines no order).
    """
    if view_uint8.ndim != 3 or view_uint8.shape[2] != 3:
        raise ValueError(f"view must be HxWx3, got shape {view_uint8.shape}")
    if saliency.shape != view_uint8.shape[:2]:
        raise ValueError(f"saliency shape {saliency.shape} != view shape {view_uint8.shape[:2]}")
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be at least 1")
    check_map(saliency, "saliency map")
    height, width = saliency.shape
    pixels = height * width
    order = np.argsort(-np.asarray(saliency, dtype=np.float64).ravel(), kind="stable")
    rank = np.empty(pixels, dtype=np.int64)
    rank[order] = np.arange(pixels)
    counts = np.round(np.arange(steps + 1) * pixels / steps).astype(np.int64)

    device = classifier.device
    original = normalise_float_image(classifier, np.asarray(view_uint8, dtype=np.float32))
    base = normalise_float_image(classifier, baseline_image(view_uint8, baseline))
    rank_t = torch.from_numpy(rank.reshape(1, 1, height, width)).to(device)
    # Row i < steps + 1 is deletion step i; row steps + 1 + i is insertion step i.
    thresholds = torch.from_numpy(np.concatenate([counts, counts])).to(device)
    deleting = torch.arange(2 * (steps + 1), device=device) < steps + 1
    probabilities = []
    with torch.inference_mode():
        for start in range(0, len(thresholds), batch_size):
            stop = start + batch_size
            changed = rank_t < thresholds[start:stop].view(-1, 1, 1, 1)  # Bx1xHxW
            keep_original = changed ^ deleting[start:stop].view(-1, 1, 1, 1)
            batch = torch.where(keep_original, original, base)
            logits = classifier.model(batch)
            probabilities.append(logits.float().softmax(dim=-1)[:, target_class].cpu())
    scores = torch.cat(probabilities).double().numpy()
    fractions = counts / pixels
    deletion, insertion = scores[: steps + 1], scores[steps + 1 :]
    return FaithfulnessCurves(
        fractions=fractions,
        deletion=deletion,
        insertion=insertion,
        deletion_auc=curve_area(fractions, deletion),
        insertion_auc=curve_area(fractions, insertion),
    )
