"""Figures: the agreement panel's colours, sorted bars, formats, the report's links and zoom."""

from __future__ import annotations

import numpy as np
import pandas as pd
from conftest import drawn_result
from tiny_models import smooth_image, tiny_classifier

from xai_exp.cache import ExplanationCache
from xai_exp.compare.report import GalleryItem, render_html
from xai_exp.config import LimeConfig, PlotsConfig, StudyConfig
from xai_exp.data.images import ImageItem
from xai_exp.evaluate.results import ImageResult
from xai_exp.outputs import plots
from xai_exp.outputs.writer import ResultsWriter, write_run_files
from xai_exp.study.pipeline import Study, run_study


def test_agreement_panel_colours_cam_only_lime_only_and_both():
    image = np.zeros((4, 4, 3), np.uint8)
    cam = np.zeros((4, 4), bool)
    lime = np.zeros((4, 4), bool)
    cam[0, :2] = True  # (0, 0) CAM only
    lime[0, 1:3] = True  # (0, 1) both, (0, 2) LIME only
    shown = plots.agreement_image(image, cam, lime)
    base = 0.3 * 0.25
    regions = {(0, 0): plots.CAM_ONLY, (0, 1): plots.BOTH, (0, 2): plots.LIME_ONLY}
    for (row, col), colour in regions.items():
        np.testing.assert_allclose(shown[row, col], base + 0.75 * np.array(colour), atol=1e-6)
    np.testing.assert_allclose(shown[3, 3], 0.3)  # neither: the dimmed image


def test_bar_chart_is_sorted_with_the_setting_in_its_title():
    results = [
        ImageResult("low", "low", values={"iou": 0.2}),
        ImageResult("flagged", "flagged"),
        ImageResult("high", "high", values={"iou": 0.8}),
    ]
    figure = plots.iou_bar_chart(results, "gradcam-top10%-lime1000")
    axis = figure.axes[0]
    assert [t.get_text() for t in axis.get_xticklabels()] == ["high", "low", "flagged"]
    assert "gradcam-top10%-lime1000" in axis.get_title()


def test_figures_follow_plots_format(tmp_path):
    lime = LimeConfig(num_samples=40, batch_size=16)
    lime.segmentation.algorithm = "slic"
    lime.segmentation.params = {"n_segments": 16, "compactness": 10, "start_label": 0}
    study = Study(StudyConfig(lime=lime), tiny_classifier(), ExplanationCache(tmp_path / "c"))
    writer = ResultsWriter(tmp_path, "gradcam", plots=PlotsConfig(format="pdf", dpi=72))
    item = ImageItem("a", "a", smooth_image(seed=1), "h", "a")
    run_study(study, [item], on_result=writer, progress=False)
    files = write_run_files(writer, {}, {"mean_iou": 0.5}, [])
    assert (tmp_path / "overlays" / "a.pdf").read_bytes().startswith(b"%PDF")
    assert tmp_path / "iou_bar_chart.pdf" in files


def test_report_links_runs_and_zooms_images():
    item = GalleryItem(
        kind="best",
        run_id="abc123",
        run_name="gradcam",
        image="cat",
        iou=0.5,
        settings="method=gradcam",
        png=b"\x89PNG",
        url="http://127.0.0.1:5000/#/experiments/1/runs/abc123",
    )
    page = render_html("t", [], [], pd.DataFrame({"mean_iou": [0.5]}), b"\x89PNG", [item])
    assert 'href="http://127.0.0.1:5000/#/experiments/1/runs/abc123"' in page
    assert "classList.toggle('full')" in page
    assert 'class="table-wrap"' in page


def test_a_rerun_copies_its_overlays_and_a_change_draws_again(tmp_path, monkeypatch):
    cache = ExplanationCache(tmp_path / "cache")
    for name in ("first", "second", "third", "fourth"):
        (tmp_path / name).mkdir()
    first = ResultsWriter(tmp_path / "first", "gradcam", figures=cache)
    first(0, drawn_result(0.25))
    drawn = (tmp_path / "first" / "overlays" / "cat.png").read_bytes()

    def no_drawing(*_args, **_kwargs):
        raise AssertionError("drawn again")

    with monkeypatch.context() as patch:
        patch.setattr(plots, "overlay_figure", no_drawing)
        second = ResultsWriter(tmp_path / "second", "gradcam", figures=cache)
        second(0, drawn_result(0.25))
    assert (tmp_path / "second" / "overlays" / "cat.png").read_bytes() == drawn
    calls = []
    original = plots.overlay_figure
    monkeypatch.setattr(plots, "overlay_figure", lambda *a: calls.append(a) or original(*a))
    changed = ResultsWriter(tmp_path / "third", "gradcam", figures=cache)
    changed(0, drawn_result(0.5))  # another IoU: another title
    other_method = ResultsWriter(tmp_path / "fourth", "scorecam", figures=cache)
    other_method(0, drawn_result(0.25))
    assert len(calls) == 2
    assert (tmp_path / "third" / "overlays" / "cat.png").read_bytes() != drawn
