"""The explained view of an image: the model's own eval resize and centre crop, with PIL only.

A fully cached rerun computes every view (the overlay is drawn on it) but must not import torch,
and importing torchvision's or timm's transforms imports torch. So the view is not computed by
those transforms but by the very PIL calls they make on a PIL image, with their arithmetic:
torchvision's `Resize(int)` (shorter side to `resize`, longer side `int(resize * long / short)`,
truncated; the same size: unchanged), `Resize((s, s))` (timm's `crop_mode=squash`) and
`CenterCrop` (zero padding when smaller, offsets `int(round((new - size) / 2))`). The sizes
themselves (`resize`) are read off the libraries' transform objects when the model is built
(xai_exp/models/classifier.py). tests/models/test_views.py compares the pixels with timm's
`create_transform` and torchvision's `weights.transforms()` on odd sizes. `square` is
xai-exp's own view (the full centre square, bicubic, long side rounded, offsets floored),
kept as it always was.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

RESAMPLING = {  # torchvision's pil_modes_mapping, by timm's names
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
CENTER, SQUASH, SQUARE = "center", "squash", "square"
CROP_MODES = (CENTER, SQUASH, SQUARE)


@dataclass(frozen=True)
class View:
    """How an image becomes the `size` x `size` input: the resize (`resize`: the shorter side,
    or both sides for `squash`), the interpolation and the crop mode."""

    size: int
    resize: int
    interpolation: str = "bicubic"
    mode: str = CENTER

    def __post_init__(self) -> None:
        if self.mode not in CROP_MODES:
            raise ValueError(f"crop mode {self.mode!r} is not one of {', '.join(CROP_MODES)}")

    def image(self, image: np.ndarray) -> np.ndarray:
        """The view of an RGB uint8 HxWx3 image (uint8 `size` x `size` x 3)."""
        resample = RESAMPLING.get(self.interpolation, Image.Resampling.BICUBIC)
        return np.asarray(self._apply(Image.fromarray(image), resample), dtype=np.uint8).copy()

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """A boolean HxW mask of the image through the same geometry (nearest): the view's."""
        pil = Image.fromarray(mask.astype(np.uint8) * 255)
        return np.asarray(self._apply(pil, Image.Resampling.NEAREST)) > 127

    def _apply(self, pil: Image.Image, resample: Image.Resampling) -> Image.Image:
        if self.mode == SQUARE:
            return _square(pil, self.size, resample)
        width, height = pil.size
        if self.mode == SQUASH:
            new_w = new_h = self.resize
        else:
            new_w, new_h = resized_size(width, height, self.resize)
        if (new_w, new_h) != (width, height):
            pil = pil.resize((new_w, new_h), resample)
        return center_crop(pil, self.size)


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """torchvision's `Resize(shorter)` output (width, height): the long side truncated."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shorter * long / short)
    return (shorter, new_long) if width <= height else (new_long, shorter)


def center_crop(pil: Image.Image, size: int) -> Image.Image:
    """torchvision's `CenterCrop(size)` on a PIL image: zero padding first when smaller."""
    width, height = pil.size
    if size > width or size > height:
        left = (size - width) // 2 if size > width else 0
        top = (size - height) // 2 if size > height else 0
        padded = Image.new(pil.mode, (max(width, size), max(height, size)), 0)
        padded.paste(pil, (left, top))
        pil, (width, height) = padded, padded.size
        if (width, height) == (size, size):
            return pil
    top, left = round((height - size) / 2.0), round((width - size) / 2.0)  # half to even
    return pil.crop((left, top, left + size, top + size))


def _square(pil: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    width, height = pil.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    pil = pil.resize((new_w, new_h), resample)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return pil.crop((left, top, left + size, top + size))


def fit_to_input(image: np.ndarray, size: int) -> np.ndarray:
    """The full centre square view (`model.preprocess=square`), uint8."""
    return View(size, size, "bicubic", SQUARE).image(image)


def fit_mask_to_input(mask: np.ndarray, size: int) -> np.ndarray:
    """A boolean mask through the full centre square view (nearest)."""
    return View(size, size, "bicubic", SQUARE).mask(mask)
