"""RISE (Petsiuk, Das and Saenko, 2018, "RISE: Randomized Input Sampling for Explanation of
Black-box Models"): the target probability of randomly masked views, averaged per pixel.

Masks follow the authors' code (github.com/eclique/RISE, `explanations.py`, `generate_masks`):
N binary s x s grids, each cell kept with probability p; each grid is upsampled bilinearly to
(s + 1) * ceil(H / s) x (s + 1) * ceil(W / s) and cropped to H x W at a random shift in
[0, ceil(H / s)) x [0, ceil(W / s)), so mask values are in [0, 1] and the cell borders fall
anywhere. The masked input is the normalised view times the mask, as there (masked pixels go to 0
in normalised space, the dataset mean colour), and the saliency is
sum_i P(target | view * M_i) * M_i / (N * p).

Deviations: the upsampling is torch's `F.interpolate(mode="bilinear", align_corners=False)`
instead of skimage's `resize(order=1, mode="reflect", anti_aliasing=False)`. Both sample at
half-pixel centres; they differ only in the outermost half source cell, where torch repeats the
edge cell and skimage mirrors it. The random draws come from `np.random.default_rng(seed)`
(all grids first, then the row shifts, then the column shifts), not numpy's global RNG, so a
seed gives the same masks at any batch size, and the masks are made batch by batch instead of
all being held in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from xai_exp.models import inference
from xai_exp.models.classifier import Classifier


@dataclass(frozen=True)
class MaskDraws:
    """The random part of N RISE masks: the binary grids and each crop's (row, column) shift."""

    grids: np.ndarray  # N x s x s float32, 1 = kept
    shifts: np.ndarray  # N x 2 int, row and column offsets of the crop
    keep_probability: float

    def __len__(self) -> int:
        return len(self.grids)


def _check(
    view: np.ndarray,
    classifier: Classifier,
    target: int,
    num_masks: int,
    grid_size: int,
    keep_probability: float,
    batch_size: int = 1,
) -> None:
    if view.ndim != 3 or view.shape[2] != 3:
        raise ValueError(f"view must be an H x W x 3 RGB image, not shape {view.shape}")
    classes = len(classifier.labels)
    if target < 0 or (classes and target >= classes):
        raise ValueError(f"target={target} is not a class index of {classifier.arch}")
    if num_masks <= 0:
        raise ValueError(f"num_masks must be at least 1, not {num_masks}")
    if grid_size < 1:
        raise ValueError(f"grid_size must be at least 1, not {grid_size}")
    if not 0.0 < keep_probability <= 1.0:
        raise ValueError(f"keep_probability must be in (0, 1], not {keep_probability}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")


def cell_size(height: int, width: int, grid_size: int) -> tuple[int, int]:
    """Pixels per grid cell in the upsampled mask: ceil(H / s), ceil(W / s)."""
    return math.ceil(height / grid_size), math.ceil(width / grid_size)


def draw_masks(
    seed: int, num_masks: int, grid_size: int, keep_probability: float, height: int, width: int
) -> MaskDraws:
    """Grids and shifts of `num_masks` masks, all drawn from `np.random.default_rng(seed)`."""
    rng = np.random.default_rng(seed)
    grids = (rng.random((num_masks, grid_size, grid_size)) < keep_probability).astype(np.float32)
    cell_h, cell_w = cell_size(height, width, grid_size)
    rows = rng.integers(0, cell_h, num_masks)
    cols = rng.integers(0, cell_w, num_masks)
    return MaskDraws(grids, np.stack([rows, cols], axis=1), keep_probability)


def upsample(grids: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """N x s x s grids to N x (s + 1) * cell_h x (s + 1) * cell_w, bilinear (half-pixel)."""
    grid_size = grids.shape[-1]
    cell_h, cell_w = cell_size(height, width, grid_size)
    size = ((grid_size + 1) * cell_h, (grid_size + 1) * cell_w)
    return F.interpolate(grids[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def make_masks(
    draws: MaskDraws, start: int, stop: int, height: int, width: int, device: torch.device
) -> torch.Tensor:
    """Masks `start`..`stop` (B x H x W float32 on `device`): upsampled grids, cropped."""
    grids = torch.from_numpy(draws.grids[start:stop]).to(device)
    big = upsample(grids, height, width)
    return torch.stack(
        [
            big[i, row : row + height, col : col + width]
            for i, (row, col) in enumerate(draws.shifts[start:stop].tolist())
        ]
    )


def rise(
    classifier: Classifier,
    view: np.ndarray,
    target: int,
    *,
    num_masks: int,
    grid_size: int,
    keep_probability: float,
    seed: int,
    batch_size: int,
    precision: str = "fp32",
) -> np.ndarray:
    """RISE saliency (H x W float32) of P(target | view), masked views classified in batches.

    `batch_size` masked views go to `inference.forward_logits` at a time (ONNX Runtime or the
    fast torch copy, as `prepare_for_inference` chose); the map does not depend on it beyond
    float rounding. The masked batch is built in NHWC, so its NCHW view is channels_last.
    """
    _check(view, classifier, target, num_masks, grid_size, keep_probability, batch_size)
    height, width = view.shape[:2]
    draws = draw_masks(seed, num_masks, grid_size, keep_probability, height, width)
    device = classifier.device
    pixels = classifier.normalised_pixels(view)  # 1 x H x W x 3
    saliency = torch.zeros(height * width, dtype=torch.float64, device=device)
    with torch.inference_mode():
        for start in range(0, num_masks, batch_size):
            masks = make_masks(draws, start, start + batch_size, height, width, device)
            batch = (pixels * masks[..., None]).permute(0, 3, 1, 2)
            logits = inference.forward_logits(classifier, batch, precision)
            probability = logits.softmax(dim=-1)[:, target].double()
            saliency += probability @ masks.reshape(len(masks), -1).double()
    saliency /= num_masks * keep_probability
    return saliency.reshape(height, width).float().cpu().numpy()


def rise_reference(
    classifier: Classifier,
    view: np.ndarray,
    target: int,
    *,
    num_masks: int,
    grid_size: int,
    keep_probability: float,
    seed: int,
) -> np.ndarray:
    """RISE one mask at a time through `classifier.model` (fp32): the same masks as `rise`."""
    _check(view, classifier, target, num_masks, grid_size, keep_probability)
    height, width = view.shape[:2]
    draws = draw_masks(seed, num_masks, grid_size, keep_probability, height, width)
    image = classifier.input_tensor(view)  # 1 x 3 x H x W
    saliency = torch.zeros(height, width, dtype=torch.float64)
    with torch.no_grad():
        for i in range(num_masks):
            grid = torch.from_numpy(draws.grids[i]).to(classifier.device)[None, None]
            cell_h, cell_w = cell_size(height, width, grid_size)
            big = F.interpolate(
                grid,
                size=((grid_size + 1) * cell_h, (grid_size + 1) * cell_w),
                mode="bilinear",
                align_corners=False,
            )
            row, col = (int(v) for v in draws.shifts[i])
            # contiguous, so the masked input keeps the input's layout (channels_last)
            mask = big[0, 0, row : row + height, col : col + width].contiguous()
            probabilities = classifier.model(image * mask).float().softmax(dim=-1)
            saliency += float(probabilities[0, target]) * mask.double().cpu()
    return (saliency / (num_masks * keep_probability)).float().numpy()
