"""The explained view of an image: the model's resize and centre crop, with PIL (no torch)."""

from __future__ import annotations

import numpy as np
from PIL import Image

RESAMPLING = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def _fit(
    pil: Image.Image, size: int, resample: Image.Resampling, crop_fraction: float = 1.0
) -> Image.Image:
    width, height = pil.size
    shorter = max(size, round(size / crop_fraction))
    scale = shorter / min(width, height)
    new_w, new_h = max(shorter, round(width * scale)), max(shorter, round(height * scale))
    pil = pil.resize((new_w, new_h), resample)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return pil.crop((left, top, left + size, top + size))


def fit_to_input(
    image: np.ndarray, size: int, crop_fraction: float = 1.0, interpolation: str = "bicubic"
) -> np.ndarray:
    """Resize the shorter side to `size / crop_fraction` and centre-crop `size` x `size`: the
    explained view, uint8 (crop_fraction 1: today's full square)."""
    resample = RESAMPLING.get(interpolation, Image.Resampling.BICUBIC)
    fitted = _fit(Image.fromarray(image), size, resample, crop_fraction)
    return np.asarray(fitted, dtype=np.uint8).copy()


def fit_mask_to_input(mask: np.ndarray, size: int, crop_fraction: float = 1.0) -> np.ndarray:
    """A boolean mask of the image through the same resize and crop (nearest): the view's."""
    pil = Image.fromarray(mask.astype(np.uint8) * 255)
    fitted = _fit(pil, size, Image.Resampling.NEAREST, crop_fraction)
    return np.asarray(fitted) > 127
