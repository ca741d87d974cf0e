"""The study at a glance: run names, the end blocks, links, report titles and galleries, and a
random-init model marked wherever its results show."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY_STUDY, FakeImage, drawn_result
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from PIL import Image
from tiny_models import smooth_image

from xai_exp.app.hydra_app import compose_config
from xai_exp.app.job import JobContext, execute, run_name, run_note, where_to_look
from xai_exp.app.sweep import PARENT_FILE, MlflowSweepCallback
from xai_exp.compare import comparison as cmp
from xai_exp.compare.report import gallery_rows
from xai_exp.config import honour_data_dir
from xai_exp.outputs import plots
from xai_exp.track.runs import (
    SHARED_VIEW_TAG,
    RunLogger,
    run_url,
    runs_table_url,
    share_table_view,
)

GOLDFISH = "n01443537"  # class 1 of ImageNet-1k


# --------------------------------------------------------------------------- run names


def test_run_name_leads_with_data_and_model_then_the_setting(tmp_path):
    context = JobContext(output_dir=tmp_path / "13-50-12")
    bundled = run_name(compose_config([]), context)
    assert bundled == "bundled/efficientnet_lite0/gradcam-top10%-lime1000@13-50-12"

    folder = tmp_path / "my_photos"
    folder.mkdir()
    overrides = [f"data.dir={folder}", "model=resnet18", "model.weights=null", "threshold=top5"]
    cfg = honour_data_dir(compose_config(overrides), overrides)
    name = run_name(cfg, context)
    assert name.startswith("my_photos/resnet18-random-init/gradcam-top5%-")
    assert name.endswith("@13-50-12")
    assert "random-init" not in bundled  # the bundled model has real weights


def test_a_sweep_run_is_named_by_its_swept_overrides_data_and_model_first(tmp_path):
    (tmp_path / PARENT_FILE).write_text(
        json.dumps({"run_id": "p", "uri": "", "swept_keys": ["method", "model.arch"]})
    )
    overrides = ("method=hirescam", "model.arch=resnet18", "model.weights=null")
    context = JobContext(
        output_dir=tmp_path / "0", multirun=True, sweep_dir=str(tmp_path), task_overrides=overrides
    )
    cfg = compose_config(["model=resnet18", *overrides])
    assert run_name(cfg, context) == "model.arch=resnet18,method=hirescam/random-init"
    trained = compose_config(["method=hirescam"])
    assert run_name(trained, context) == "model.arch=resnet18,method=hirescam"


# --------------------------------------------------------------------------- random init


def _texts(figure) -> str:
    titles = [figure.get_suptitle()] + [axis.get_title() for axis in figure.axes]
    return "\n".join(titles)


def test_a_random_init_overlay_and_bar_chart_say_so_and_are_not_reused_from_the_cache():
    result = drawn_result(label="cauliflower", probability=0.0)
    assert "random weights" in _texts(plots.overlay_figure(result, "gradcam", True))
    assert "random weights" not in _texts(plots.overlay_figure(result, "gradcam"))
    random = plots.overlay_fingerprint(result, "gradcam", 100, ".png", True)
    assert random != plots.overlay_fingerprint(result, "gradcam", 100, ".png", False)
    chart = plots.iou_bar_chart([result], "setting", random_weights=True)
    assert "(random weights)" in chart.axes[0].get_title()
    assert "random" not in plots.iou_bar_chart([result], "setting").axes[0].get_title()


def test_run_note_and_end_block_mention_random_weights_only_for_them(tmp_path):
    summary = {"mean_iou": 0.2, "n_compared": 2, "n_images": 2}
    random = compose_config(["model=resnet18", "model.weights=null"])
    trained = compose_config(["model=resnet18"])
    assert "random weights" in run_note(random, summary, []).lower()
    assert "random weights" not in run_note(trained, summary, []).lower()
    assert "random weights" in where_to_look(random, tmp_path, None, summary)
    assert "random weights" not in where_to_look(trained, tmp_path, None, summary)
    checkpoint = compose_config(["model=resnet18", "model.weights=null", "model.checkpoint=x.pt"])
    assert "random weights" not in where_to_look(checkpoint, tmp_path, None, summary)


# --------------------------------------------------------------------------- end blocks


def test_the_end_block_shows_top1_accuracy_only_when_the_data_had_labels(tmp_path):
    cfg = compose_config([])
    labelled = {"mean_iou": 0.2, "top1_accuracy": 0.75, "top1_accuracy_ci_low": 0.5,
                "top1_accuracy_ci_high": 1.0}  # fmt: skip
    block = where_to_look(cfg, tmp_path, None, labelled)
    assert "top-1 accuracy 0.750 [0.500, 1.000] (95% CI)" in block
    assert "mean IoU       0.200" in block
    unlabelled = {"mean_iou": 0.2, "top1_accuracy": math.nan}
    assert "top-1" not in where_to_look(cfg, tmp_path, None, unlabelled)
    assert "top-1" not in where_to_look(cfg, tmp_path, None, {"mean_iou": 0.2})


def test_the_end_block_leads_with_agreement_above_chance_and_flags_few_images(tmp_path):
    cfg = compose_config([])
    summary = {
        "mean_iou": 0.2,
        "mean_iou_corrected": 0.31,
        "mean_iou_corrected_ci_low": 0.1,
        "mean_iou_corrected_ci_high": 0.5,
        "mean_iou_chance": 0.07,
        "n_compared": 4,
    }
    block = where_to_look(cfg, tmp_path, None, summary)
    assert "above chance   0.310 [0.100, 0.500] (95% CI), chance level 0.070" in block
    assert "careful        interval from 4 < 10 images: covers less than 95%" in block
    assert "careful" not in where_to_look(cfg, tmp_path, None, {**summary, "n_compared": 10})


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(smooth_image(32, seed)).save(path)


@pytest.mark.slow
def test_a_labelled_random_init_run_says_so_from_start_to_end(tmp_path, capsys, caplog):
    """A real run: the start warning, the run's name and note, and the end block with its
    accuracy and links, one of which opens the runs table with mean_iou shown."""
    for n in range(2):
        _png(tmp_path / "images" / GOLDFISH / f"g{n}.png", seed=n)
    overrides = [
        *[o for o in TINY_STUDY if not o.startswith("data.limit")],
        f"data.dir={tmp_path / 'images'}",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"cache.dir={tmp_path}/cache",
        "lime.num_samples=10",
    ]
    cfg = honour_data_dir(compose_config(overrides), overrides)
    with caplog.at_level(logging.WARNING, logger="xai_exp"):
        execute(cfg, JobContext(output_dir=tmp_path / "out", task_overrides=tuple(overrides)))
    assert "the model has random weights" in caplog.text  # at start, before the images
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("xai-exp")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name.startswith("images/resnet18-random-init/gradcam-top10%-lime10@")
    assert "random weights" in run.data.tags["mlflow.note.content"]
    out = capsys.readouterr().out
    accuracy = run.data.metrics["top1_accuracy"]
    assert f"top-1 accuracy {accuracy:.3f}" in out
    assert "caution        the model has random weights" in out
    assert run_url(cfg.tracking.uri, experiment.experiment_id, run.info.run_id) in out
    [table] = [line.split()[-1] for line in out.splitlines() if "runs table" in line]
    key = table.split("viewStateShareKey=")[1].split("&")[0]
    view = json.loads(client.get_experiment(experiment.experiment_id).tags[SHARED_VIEW_TAG + key])
    assert view["orderByKey"] == "metrics.`mean_iou_corrected`"
    assert "metrics.`mean_iou`" in view["selectedColumns"]


def test_the_sweep_end_block_prints_the_parent_url(tracking_store, tmp_path, capsys):
    store = tracking_store
    callback = MlflowSweepCallback()
    callback.cfg = OmegaConf.create({"tracking": {"uri": store.uri}})
    callback.sweep_dir = tmp_path / "sweep"
    callback.sweep_dir.mkdir()
    parent = RunLogger.start(store.client, store.experiment_id, "sweep x", {"role": "sweep"})
    callback._finish(parent, interrupted=False)  # no children: no comparison, still closed
    out = capsys.readouterr().out
    assert f"  parent run     {run_url(store.uri, store.experiment_id, parent.run_id)}" in out
    assert store.client.get_run(parent.run_id).info.status == "FINISHED"


# --------------------------------------------------------------------------- links


def test_links_open_the_classic_view_and_the_table_with_mean_iou(tracking_store):
    store = tracking_store
    assert run_url(store.uri, "3", "abc") == (
        "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    )
    assert run_url("http://user:pw@host:5001/", "3", "abc").startswith(
        "http://user:***@host:5001/#/experiments/3/runs/abc?"
    )
    key = share_table_view(store.client, store.experiment_id)
    assert key is not None
    assert share_table_view(store.client, store.experiment_id) == key  # one view, one tag
    assert runs_table_url(store.uri, "3", key) == (
        "http://127.0.0.1:5000/#/experiments/3/runs"
        f"?viewStateShareKey={key}&workflowType=machine_learning"
    )
    tags = store.client.get_experiment(store.experiment_id).tags
    view = json.loads(tags[SHARED_VIEW_TAG + key])
    assert view["selectedColumns"][:2] == ["metrics.`mean_iou_corrected`", "metrics.`mean_iou`"]
    assert view["orderByAsc"] is False
    assert runs_table_url(store.uri, "3") == (  # no view stored: sorted by mean_iou at least
        "http://127.0.0.1:5000/#/experiments/3/runs"
        "?orderByKey=metrics.%60mean_iou_corrected%60&orderByAsc=false&workflowType=machine_learning"
    )


# --------------------------------------------------------------------------- the report


def test_the_report_title_names_what_was_compared(tracking_store, make_study_run):
    store = tracking_store
    for fraction in (0.2, 0.05, 0.1):
        make_study_run(store.client, store.experiment_id, [FakeImage("a", 0.5)],
                       cam_top_fraction=fraction, params={"data.dir": "null"})  # fmt: skip
    comparison = cmp.compare(store.uri, out_dir=store.root / "report")
    title = "gradcam vs LIME: CAM top 5% vs 10% vs 20% on bundled, resnet18"
    page = (store.root / "report" / cmp.HTML_NAME).read_text(encoding="utf-8")
    assert f"<h1>{title}</h1>" in page
    assert "experiment &#x27;xai-exp&#x27;" in page  # the scope is in the meta lines
    assert len(comparison.runs) == 3


def test_the_report_title_names_methods_and_a_random_init_model():
    frame = pd.DataFrame(
        {
            "method": ["gradcam", "hirescam"],
            "cam_top_fraction": [0.1, 0.1],
            "lime_samples": [1000, 500],
            "model.arch": ["resnet18"] * 2,
            "model.weights": ["null"] * 2,
            "data.dir": ["/data/cats"] * 2,
        }
    )
    assert cmp.comparison_title(frame) == (
        "gradcam vs hirescam vs LIME: LIME samples 500 vs 1000 on cats, resnet18 (random weights)"
    )


def test_best_and_worst_are_picked_per_setting_and_never_overlap():
    rows = pd.DataFrame(
        {
            "run_id": ["r1"] * 4 + ["r2"] * 2,
            "run_name": ["one"] * 4 + ["two"] * 2,
            "image": ["a", "b", "c", "a", "a", "b"],  # r1 has image a twice (a rerun)
            "iou": [0.9, 0.5, 0.1, 0.2, 0.3, 0.8],
        }
    )
    first = gallery_rows(rows[rows["run_id"] == "r1"], size=2)
    best = [row["image"] for kind, row in first if kind == "best"]
    worst = [row["image"] for kind, row in first if kind == "worst"]
    assert best == ["a", "b"]
    assert worst == ["c"]  # a is in one list only, once
    second = gallery_rows(rows[rows["run_id"] == "r2"], size=3)
    assert [(kind, row["image"]) for kind, row in second] == [("best", "b"), ("worst", "a")]
