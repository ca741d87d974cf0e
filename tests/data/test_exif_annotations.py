"""Boxes and masks of EXIF-rotated photos land on the object as the loader shows it upright."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xai_exp.data.annotations import Annotations
from xai_exp.data.images import load_image
from xai_exp.evaluate.overlap import iou

WIDTH, HEIGHT = 64, 40  # stored pixels: landscape, so a quarter turn changes the shape
BOX = (8, 16, 24, 32)  # xmin, ymin, xmax, ymax of the red object in the stored pixels


def photo(folder: Path, orientation: int) -> Path:
    """A JPEG whose stored pixels hold a red object at BOX, tagged with `orientation`."""
    stored = np.full((HEIGHT, WIDTH, 3), 30, np.uint8)
    xmin, ymin, xmax, ymax = BOX
    stored[ymin:ymax, xmin:xmax] = (230, 20, 20)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = folder / "espresso.jpg"
    Image.fromarray(stored).save(path, quality=100, exif=exif)
    return path


def red(image: np.ndarray) -> np.ndarray:
    """Where the object is in the loaded (upright) image."""
    return (image[..., 0] > 128) & (image[..., 1] < 100)


def voc_xml(folder: Path, width: int, height: int, box: tuple[int, ...]) -> Path:
    xml = folder / "boxes"
    xml.mkdir()
    xmin, ymin, xmax, ymax = box
    (xml / "espresso.xml").write_text(
        f"<annotation><size><width>{width}</width><height>{height}</height><depth>3</depth>"
        f"</size><object><name>espresso</name><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
        f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object></annotation>"
    )
    return xml


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_voc_box_in_the_stored_frame_lands_on_the_upright_object(tmp_path, orientation):
    path = photo(tmp_path, orientation)
    image = load_image(path)
    if orientation >= 5:
        assert image.shape[:2] == (WIDTH, HEIGHT)  # the loader turned it a quarter
    annotations = Annotations.open(None, str(voc_xml(tmp_path, WIDTH, HEIGHT, BOX)))
    mask = annotations.object_mask(path, path.name, image.shape[:2])
    assert iou(mask, red(image)) > 0.95


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_csv_box_and_a_mask_file_turn_with_the_image(tmp_path, orientation):
    path = photo(tmp_path, orientation)
    image = load_image(path)
    xmin, ymin, xmax, ymax = BOX
    csv = tmp_path / "boxes.csv"
    csv.write_text(f"file,xmin,ymin,xmax,ymax\nespresso.jpg,{xmin},{ymin},{xmax},{ymax}\n")
    boxed = Annotations.open(None, str(csv)).object_mask(path, path.name, image.shape[:2])
    assert iou(boxed, red(image)) > 0.95
    masks = tmp_path / "masks"
    masks.mkdir()
    stored = np.zeros((HEIGHT, WIDTH), np.uint8)
    stored[ymin:ymax, xmin:xmax] = 255  # the object in the stored pixels, no EXIF of its own
    Image.fromarray(stored).save(masks / "espresso.png")
    drawn = Annotations.open(str(masks), None).object_mask(path, path.name, image.shape[:2])
    assert iou(drawn, red(image)) > 0.95


def test_a_box_declared_in_the_upright_frame_is_honoured(tmp_path):
    path = photo(tmp_path, 6)
    image = load_image(path)  # HEIGHT wide, WIDTH tall
    rows, cols = np.nonzero(red(image))
    upright = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    annotations = Annotations.open(None, str(voc_xml(tmp_path, HEIGHT, WIDTH, upright)))
    mask = annotations.object_mask(path, path.name, image.shape[:2])
    assert iou(mask, red(image)) > 0.95
