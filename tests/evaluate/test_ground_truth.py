"""Ground truth: annotations (masks, box CSV, ImageNet XML) and the localisation metrics."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from conftest import TINY_STUDY
from PIL import Image

from xai_exp.app.hydra_app import compose_config
from xai_exp.app.job import JobContext, execute
from xai_exp.config import honour_data_dir
from xai_exp.data.annotations import Annotations, read_xml_boxes
from xai_exp.evaluate.localisation import energy_pointing_game, pointing_game, relevance_mass
from xai_exp.models.classifier import fit_mask_to_input


def test_localisation_metrics_follow_their_definitions_on_toy_maps():
    target = np.zeros((4, 4), dtype=bool)
    target[:2, :2] = True
    saliency = np.array(
        [[4.0, 1.0, 0.0, 0.0], [1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    )
    assert pointing_game(saliency, target) is True
    assert pointing_game(saliency.T[::-1], target) is False  # the peak moved outside
    # Quantus relevance mass accuracy: 8 of 10 inside
    assert relevance_mass(saliency, target) == pytest.approx(0.8)
    assert energy_pointing_game(saliency, target) == pytest.approx(0.8)
    signed = saliency.copy()
    signed[3, 3] = -2.0  # LIME-like negative weight outside
    assert relevance_mass(signed, target) == pytest.approx(8 / 7)  # Quantus: signed, abs=False
    assert energy_pointing_game(signed, target) == pytest.approx(8 / 9)  # positive energy only
    assert energy_pointing_game(-saliency, target) is None
    tie = np.zeros((4, 4))
    tie[0, 0] = tie[3, 3] = 1.0  # two maxima: one inside is a hit (Quantus)
    assert pointing_game(tie, target) is True


def test_masks_boxes_and_xml_become_object_masks(tmp_path):
    image = tmp_path / "cat.jpg"
    Image.new("RGB", (200, 100)).save(image)
    masks = tmp_path / "masks"
    masks.mkdir()
    drawn = np.zeros((50, 100), dtype=np.uint8)  # half resolution, 0/1 values
    drawn[10:20, 30:60] = 1
    Image.fromarray(drawn).save(masks / "cat.png")
    found = Annotations.open(str(masks), None).object_mask(image, "pets/cat.jpg", (100, 200))
    assert found.shape == (100, 200)
    assert found.sum() == 20 * 60
    assert found[20:40, 60:120].all()

    boxes = tmp_path / "boxes.csv"
    boxes.write_text("file,xmin,ymin,xmax,ymax\ncat.jpg,0,0,100,50\ncat.jpg,150,80,200,100\n")
    found = Annotations.open(None, str(boxes)).object_mask(image, "cat.jpg", (50, 100))
    assert found.sum() == 50 * 25 + 25 * 10  # both boxes, scaled to the 100x50 image
    assert Annotations.open(None, str(boxes)).object_mask(image, "dog.jpg", (50, 100)) is None

    xml = tmp_path / "xml"
    xml.mkdir()
    (xml / "cat.xml").write_text(
        "<annotation><size><width>400</width><height>200</height></size>"
        "<object><name>n02123045</name><bndbox><xmin>0</xmin><ymin>0</ymin><xmax>200</xmax>"
        "<ymax>100</ymax></bndbox></object></annotation>"
    )
    assert read_xml_boxes(xml / "cat.xml") == ([(0.0, 0.0, 200.0, 100.0)], (400, 200))
    found = Annotations.open(None, str(xml)).object_mask(image, "cat.jpg", (100, 200))
    assert found.sum() == 50 * 100  # the XML's 400x200 grid, scaled to the loaded 200x100


def test_the_object_mask_follows_the_view_crop():
    mask = np.zeros((100, 200), dtype=bool)
    mask[:, :50] = True  # the left quarter: cropped away by the centre square
    assert not fit_mask_to_input(mask, 32).any()
    mask[:, 90:110] = True
    view = fit_mask_to_input(mask, 32)
    assert view.shape == (32, 32)
    assert view[:, 14:18].all()


@pytest.mark.slow
def test_ground_truth_metrics_in_a_study_and_images_without_annotation(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(
            folder / f"{name}.png"
        )
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.full((48, 64), 255, np.uint8)).save(masks / "a.png")  # "a": all object
    overrides = [
        *[o for o in TINY_STUDY if not o.startswith("data.limit")],
        f"data.dir={folder}",
        f"data.masks_dir={masks}",
        "lime.num_samples=10",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"cache.dir={tmp_path}/cache",
    ]
    cfg = honour_data_dir(compose_config(overrides), overrides)
    execute(cfg, JobContext(output_dir=tmp_path / "out", task_overrides=tuple(overrides)))
    rows = {r["image"]: r for r in csv.DictReader((tmp_path / "out" / "results.csv").open())}
    whole = rows["a.png"]
    # an object that is the whole view: IoU = mask share, all mass inside, the peak inside
    assert float(whole["cam_object_iou"]) == pytest.approx(float(whole["cam_mask_fraction"]))
    assert float(whole["cam_relevance_mass"]) == pytest.approx(1.0)
    assert float(whole["cam_energy_pointing_game"]) == pytest.approx(1.0)
    assert whole["cam_pointing_game"] == "True"
    assert float(whole["reference_object_iou"]) == pytest.approx(
        float(whole["reference_mask_fraction"])
    )
    assert all(rows["b.png"][k] == "" for k in ("cam_object_iou", "reference_relevance_mass"))
