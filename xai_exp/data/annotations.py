"""Object annotations for ground-truth metrics: a binary mask per image, or bounding boxes.

- `data.masks_dir`: one mask image per image, found by the image's stem (``cat.jpg`` ->
  ``cat.png``, any supported extension); non-zero pixels are the object.
- `data.boxes`: a CSV of ``file,xmin,ymin,xmax,ymax`` rows (header optional, several rows per
  image allowed; files by relative path, name or stem) or a folder of ImageNet bounding-box XML
  files (``<stem>.xml``, every ``object/bndbox``). Coordinates are pixels of the image file as
  stored (an XML's ``size`` when it has one); they are scaled to the loaded image.

A photo with an EXIF orientation is loaded upright; its boxes and masks are taken in the frame
the file stores its pixels in (where ImageNet's and VOC's boxes are) and turned with it, all
eight orientations. An annotation that declares the upright frame instead is honoured: an XML
``size``, or a mask, whose width and height are the upright image's (not the stored ones), or a
mask file with an EXIF orientation of its own.

Images without an annotation get none (their ground-truth metrics are left empty).
"""

from __future__ import annotations

import csv
import io
import math
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from xai_exp.data.images import (
    EXIF_TRANSPOSES,
    SUPPORTED_EXTENSIONS,
    DataError,
    ImageLoadError,
    load_image,
    name_keys,
)

Box = tuple[float, float, float, float]
_MAX_XML_BYTES = 1 << 20


class AnnotationError(ValueError):
    """One image's annotation is unusable; the message says which file and why."""


@dataclass
class Annotations:
    """Where the object masks or boxes are, and the boxes of a CSV, read once."""

    masks_dir: Path | None = None
    xml_dir: Path | None = None
    boxes: dict[str, list[Box]] = field(default_factory=dict)

    @classmethod
    def open(cls, masks_dir: str | None, boxes: str | None) -> Annotations | None:
        """The configured annotations (None when there are none); DataError when missing."""
        if not masks_dir and not boxes:
            return None
        found = cls()
        if masks_dir:
            found.masks_dir = Path(masks_dir).expanduser()
            if not found.masks_dir.is_dir():
                raise DataError(f"data.masks_dir={masks_dir} is not a folder of object masks")
        if boxes:
            path = Path(boxes).expanduser()
            if path.is_dir():
                found.xml_dir = path
            elif path.is_file():
                found.boxes = read_boxes(path)
            else:
                raise DataError(f"data.boxes={boxes} is neither a CSV of boxes nor a folder of XML")
        return found

    def object_mask(self, path: Path, name: str, shape: tuple[int, int]) -> np.ndarray | None:
        """The object as an HxW boolean mask of the loaded image (`shape`), or None."""
        keys = name_keys(name)
        stem = keys[-1]
        if self.masks_dir is not None:
            for extension in SUPPORTED_EXTENSIONS:
                candidate = self.masks_dir / f"{stem}{extension}"
                if candidate.is_file():
                    return self._mask_file(candidate, path, shape)
        boxes = next((self.boxes[k] for k in keys if k in self.boxes), None)
        size = None
        if boxes is None and self.xml_dir is not None:
            candidate = self.xml_dir / f"{stem}.xml"
            if candidate.is_file():
                boxes, size = read_xml_boxes(candidate)
        if boxes is None:
            return None
        stored, orientation = stored_frame(path)
        size = size or stored
        if not _upright(size, stored, orientation):  # boxes of the stored pixels: turn them
            height, width = shape
            frame = (width, height) if orientation in _SWAPS_AXES else shape
            return orient(_rasterise(boxes, size, frame), orientation)
        return _rasterise(boxes, size, shape)

    def _mask_file(self, mask_path: Path, image_path: Path, shape: tuple[int, int]) -> np.ndarray:
        """A mask file on the loaded image: turned with the image unless already upright."""
        try:
            mask = load_image(mask_path).max(axis=2) > 0  # its own EXIF orientation applied
        except ImageLoadError as error:
            raise AnnotationError(f"object mask {mask_path}: {error.reason}") from None
        own = stored_frame(mask_path)[1] != 1
        stored, orientation = stored_frame(image_path)
        if not own and not _upright((mask.shape[1], mask.shape[0]), stored, orientation):
            mask = orient(mask, orientation)
        return _fit(mask, shape)


_SWAPS_AXES = (5, 6, 7, 8)  # orientations whose upright image swaps width and height


def stored_frame(path: Path) -> tuple[tuple[int, int], int]:
    """The image file's stored (width, height) and its EXIF orientation (1: upright; also for
    a missing or malformed tag, as the loader then keeps the pixels as stored)."""
    try:
        with Image.open(path) as image:
            size = image.size
            try:
                orientation = int(image.getexif().get(0x0112, 1))
            except Exception:  # noqa: BLE001 - broken EXIF: the loader ignores it too
                orientation = 1
    except OSError as error:
        raise AnnotationError(f"cannot read {path} ({error})") from None
    return size, orientation if orientation in EXIF_TRANSPOSES else 1


def orient(mask: np.ndarray, orientation: int) -> np.ndarray:
    """A mask of the stored pixels, turned as the loader turns the image (EXIF orientation)."""
    method = EXIF_TRANSPOSES.get(orientation)
    if method is None:
        return mask
    turned = Image.fromarray(mask.astype(np.uint8) * 255).transpose(method)
    return np.asarray(turned) > 127


def _upright(size: tuple[int, int], stored: tuple[int, int], orientation: int) -> bool:
    """Whether an annotation of `size` (width, height) is already in the upright frame: the
    image needs no turn, or the annotation has the upright shape rather than the stored one."""
    if orientation == 1:
        return True
    if orientation not in _SWAPS_AXES or size[1] <= 0 or stored[1] <= 0:
        return False  # flips and half turns keep the shape: the stored frame, as documented
    aspect, stored_aspect = size[0] / size[1], stored[0] / stored[1]
    return abs(aspect - 1 / stored_aspect) < abs(aspect - stored_aspect)


def _fit(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A mask resized (nearest) to `shape`."""
    if mask.shape != shape:
        resized = Image.fromarray(mask.astype(np.uint8) * 255).resize(
            (shape[1], shape[0]), Image.Resampling.NEAREST
        )
        mask = np.asarray(resized) > 127
    return mask


def _rasterise(boxes: list[Box], size: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """Boxes in a `size` (width, height) pixel grid drawn on an HxW mask of `shape`."""
    height, width = shape
    if size[0] <= 0 or size[1] <= 0:
        raise AnnotationError(f"annotated image size {size} has no pixels")
    scale_x, scale_y = width / size[0], height / size[1]
    mask = np.zeros(shape, dtype=bool)
    for xmin, ymin, xmax, ymax in boxes:
        left, right = math.floor(xmin * scale_x), math.ceil(xmax * scale_x)
        top, bottom = math.floor(ymin * scale_y), math.ceil(ymax * scale_y)
        mask[max(0, top) : min(height, bottom), max(0, left) : min(width, right)] = True
    return mask


def _box(values: list[str], where: str) -> Box:
    try:
        xmin, ymin, xmax, ymax = (float(v) for v in values)
    except ValueError:
        raise AnnotationError(f"{where}: a box needs four numbers, got {values}") from None
    if not (xmax > xmin and ymax > ymin):
        raise AnnotationError(f"{where}: box {values} has no area")
    return (xmin, ymin, xmax, ymax)


def read_boxes(path: Path) -> dict[str, list[Box]]:
    """``file -> boxes`` from a CSV of file,xmin,ymin,xmax,ymax rows; DataError when unusable."""
    try:
        text = path.read_text(encoding="utf-8-sig")
        rows = [r for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
        if rows and rows[0] and not _is_number(rows[0][1] if len(rows[0]) > 1 else ""):
            rows = rows[1:]  # a header
        boxes: dict[str, list[Box]] = {}
        for number, row in enumerate(rows, 1):
            if len(row) < 5:
                raise AnnotationError(f"row {number} has {len(row)} columns, not 5")
            key = row[0].strip().replace("\\", "/")
            boxes.setdefault(key, []).append(_box(row[1:5], f"row {number}"))
    except (OSError, UnicodeDecodeError, csv.Error, AnnotationError) as error:
        raise DataError(
            f"data.boxes={path} is not a CSV of file,xmin,ymin,xmax,ymax rows ({error})"
        ) from None
    return boxes


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_xml_boxes(path: Path) -> tuple[list[Box], tuple[int, int] | None]:
    """The boxes of an ImageNet (PASCAL VOC) annotation file and its image size, if given."""
    try:
        if path.stat().st_size > _MAX_XML_BYTES:
            raise AnnotationError("larger than 1 MB")
        root = ElementTree.fromstring(path.read_bytes())
        boxes = [
            _box([box.findtext(k, "") for k in ("xmin", "ymin", "xmax", "ymax")], "bndbox")
            for box in root.iter("bndbox")
        ]
        width, height = root.findtext("size/width"), root.findtext("size/height")
        size = (int(width), int(height)) if width and height else None
    except (OSError, ElementTree.ParseError, ValueError) as error:
        raise AnnotationError(f"box file {path}: {error}") from None
    return boxes, size
