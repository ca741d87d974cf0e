"""Tests for xai_exp.compare.comparison and `xai-exp compare`, against real sqlite MLflow stores."""

from __future__ import annotations

import base64
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import EXPERIMENT, PARENT_TAG, RUN_PY, FakeImage, tiny_png
from PIL import Image

from xai_exp.app.cli import main
from xai_exp.compare import comparison as cmp
from xai_exp.evaluate.results import METRICS
from xai_exp.track.runs import RunLogger, open_store


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _sweep_parent(store) -> str:
    run = store.client.create_run(store.experiment_id, run_name="sweep x", tags={"role": "sweep"})
    return run.info.run_id


def _row(table: pd.DataFrame, **settings) -> pd.Series:
    mask = np.ones(len(table), dtype=bool)
    for key, value in settings.items():
        mask &= (table[key] == value).to_numpy()
    assert mask.sum() == 1, f"expected one row for {settings}:\n{table}"
    return table[mask].iloc[0]


def _cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "xai_exp", "compare", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --------------------------------------------------------------------------- grouping


def test_a_rerun_replaces_and_failed_runs_stay_apart(tracking_store, make_study_run):
    store = tracking_store
    client, exp = store.client, store.experiment_id
    make_study_run(
        client, exp,
        [FakeImage("a", 0.1, cam_seconds=1.0, reference_seconds=2.0),
         FakeImage("b", 0.2, cam_seconds=3.0, reference_seconds=4.0),
         FakeImage("c", 0.3, cam_seconds=5.0, reference_seconds=6.0)],
        run_name="rerun-1",
    )  # fmt: skip
    make_study_run(
        client, exp,
        [FakeImage("a", 0.5, cam_seconds=7.0, reference_seconds=8.0),
         FakeImage("b", None, status="flagged", cam_seconds=9.0, reference_seconds=10.0),
         FakeImage("c", None, status="error")],
        run_name="rerun-2", status="FAILED",
    )  # fmt: skip
    make_study_run(
        client, exp,
        [FakeImage("a", 0.15, cam_seconds=7.0, reference_seconds=8.0),
         FakeImage("b", 0.25, cam_seconds=9.0, reference_seconds=10.0)],
        run_name="rerun-3",
    )  # fmt: skip
    make_study_run(client, exp, [FakeImage("a", 0.4), FakeImage("b", 0.6)], cam_top_fraction=0.2)
    make_study_run(client, exp, [FakeImage("a", 0.9)], method="hirescam")
    make_study_run(client, exp, [FakeImage("a", 0.7)], lime_samples=50)
    make_study_run(client, exp, [FakeImage("a", 0.8)], lime_mode="area_matched")
    _sweep_parent(store)  # role=sweep: never a row

    comparison = cmp.compare(store.uri, EXPERIMENT, None, store.root / "out")
    table = comparison.table

    assert len(table) == 5
    optional = {
        n for spec in METRICS.values() if not spec.reported_when_missing for n in spec.run_metrics
    }
    shown = ["method", "cam_top_fraction", "lime_mode", "lime_samples"]  # the ones that vary
    assert list(table.columns) == [c for c in cmp.table_columns(shown) if c not in optional]
    pooled = _row(table, method="gradcam", cam_top_fraction=0.1, lime_mode="top_k", lime_samples=20)
    # a and b from the latest finished rerun, c from the first; the FAILED one stays apart
    ious = [0.15, 0.25, 0.3]
    assert pooled["runs"] == 2
    assert pooled["unfinished_runs"] == 1
    assert pooled["images"] == 3  # not 5: an image explained twice counts once
    assert pooled["compared"] == 3
    assert pooled["mean_iou"] == pytest.approx(np.mean(ious))
    assert pooled["std_iou"] == pytest.approx(np.std(ious, ddof=0))
    assert (pooled["min_iou"], pooled["max_iou"]) == pytest.approx((0.15, 0.3))
    assert pooled["mean_cam_seconds"] == pytest.approx(np.mean([7, 9, 5]))
    assert pooled["mean_reference_seconds"] == pytest.approx(np.mean([8, 10, 6]))
    assert (pooled["n_ok"], pooled["n_flagged"], pooled["n_error"]) == (3, 0, 0)

    wider = _row(table, method="gradcam", cam_top_fraction=0.2)
    assert (wider["runs"], wider["images"]) == (1, 2)
    assert wider["mean_iou"] == pytest.approx(0.5)
    assert wider["std_iou"] == pytest.approx(0.1)
    assert _row(table, method="hirescam")["mean_iou"] == pytest.approx(0.9)
    assert _row(table, lime_samples=50)["mean_iou"] == pytest.approx(0.7)
    assert _row(table, lime_mode="area_matched")["std_iou"] == 0.0

    # the CSV holds the same numbers
    written = pd.read_csv(store.root / "out" / "comparison.csv")
    assert len(written) == 5
    assert written["mean_iou"].tolist() == pytest.approx(table["mean_iou"].tolist())
    assert written["runs"].sum() == 6
    assert written["unfinished_runs"].sum() == 1


def test_every_setting_that_changes_results_is_its_own_row(tracking_store, make_study_run):
    store = tracking_store
    client, exp = store.client, store.experiment_id
    for algorithm, iou in (("quickshift", 0.2), ("slic", 0.6)):  # as `-m lime=default,slic`
        params = {"lime.segmentation.algorithm": algorithm, "tracking.uri": f"sqlite:///{iou}.db"}
        make_study_run(client, exp, [FakeImage("a", iou)], params=params)
    table = cmp.compare(store.uri, EXPERIMENT, None, store.root / "out").table
    assert len(table) == 2  # not pooled into one row
    # only what varies becomes a column (besides method and threshold); tracking never does
    assert "lime.segmentation.algorithm" in table.columns
    assert "lime_samples" not in table.columns
    assert "tracking.uri" not in table.columns
    by_algorithm = dict(zip(table["lime.segmentation.algorithm"], table["mean_iou"], strict=True))
    assert by_algorithm == {"quickshift": pytest.approx(0.2), "slic": pytest.approx(0.6)}
    page = (store.root / "out" / cmp.HTML_NAME).read_text(encoding="utf-8")
    grid = page[page.index("IoU per image and setting") :]
    assert "lime.segmentation.algorithm=slic" in grid  # one grid column per compared setting
    assert ">0.600<" in grid
    assert ">0.200<" in grid


def test_report_grid_of_a_large_study_shows_where_settings_disagree(tracking_store, make_study_run):
    store = tracking_store
    client, exp = store.client, store.experiment_id
    names = [f"img{n:03d}" for n in range(130)]
    low = {name: 0.3 for name in names}
    high = {name: 0.3 + (0.5 if n % 13 == 0 else 0.01 * (n % 7)) for n, name in enumerate(names)}
    for fraction, ious in ((0.1, low), (0.2, high)):
        images = [FakeImage(name, iou) for name, iou in ious.items()]
        make_study_run(client, exp, images, cam_top_fraction=fraction)
    out = store.root / "out"
    cmp.compare(store.uri, EXPERIMENT, None, out)
    every = pd.read_csv(out / cmp.GRID_NAME, index_col="image")
    assert len(every) == 130  # the CSV holds every image
    page = (out / cmp.HTML_NAME).read_text(encoding="utf-8")
    grid = page[page.index("IoU per image and setting") :]
    assert "100 of 130 images" in grid
    shown = [name for name in names if f"<th>{name}</th>" in grid]
    assert len(shown) == 100
    assert {names[n] for n in range(0, 130, 13)} <= set(shown)  # the widest spread first
    spread = {name: high[name] - low[name] for name in names}
    assert min(spread[n] for n in shown) >= max(spread[n] for n in names if n not in shown)


def test_metric_history_stands_in_for_a_missing_results_csv(tracking_store, make_study_run):
    store = tracking_store
    make_study_run(
        store.client, store.experiment_id,
        [FakeImage("a", 0.2, cam_seconds=1.0),
         FakeImage("b", None, status="flagged", cam_seconds=3.0),
         FakeImage("c", 0.6, cam_seconds=2.0),
         FakeImage("d", None, status="error")],
        results_csv=False,  # e.g. its upload failed: the metric histories stand in
    )  # fmt: skip
    comparison = cmp.compare(store.uri, EXPERIMENT, None, store.root / "out")
    row = comparison.table.iloc[0]
    assert (row["images"], row["compared"]) == (4, 2)
    assert row["mean_iou"] == pytest.approx(0.4)
    assert row["std_iou"] == pytest.approx(0.2)
    assert row["mean_cam_seconds"] == pytest.approx(2.0)
    assert (row["n_ok"], row["n_flagged"], row["n_error"]) == (2, 1, 1)
    assert set(comparison.images["source"]) == {"metric history"}


def test_format_table_is_fixed_width(tracking_store, make_study_run):
    store = tracking_store
    make_study_run(store.client, store.experiment_id, [FakeImage("a", 0.25)])
    make_study_run(store.client, store.experiment_id, [FakeImage("a", 0.5)], method="layercam")
    text = cmp.format_table(cmp.compare(store.uri, out_dir=store.root / "o").table)
    lines = text.splitlines()
    assert len(lines) == 3
    assert len({len(line) for line in lines}) == 1
    assert "0.250" in text
    assert "layercam" in text


# --------------------------------------------------------------------------- outputs


def test_report_is_self_contained_with_best_and_worst_overlays(tracking_store, make_study_run):
    store = tracking_store
    ious = [0.05, 0.9, 0.5, 0.3, 0.95, 0.6, 0.4]
    images = [FakeImage(f"img{i}", iou) for i, iou in enumerate(ious)]
    images.append(FakeImage("photo <b>.jpg", 0.01, stem="photo__b_"))
    first = make_study_run(store.client, store.experiment_id, images, run_name="run <one>")
    second = make_study_run(
        store.client, store.experiment_id, [FakeImage("img0", 0.7), FakeImage("img9", 0.02)],
        cam_top_fraction=0.3, run_name="run-two",
    )  # fmt: skip
    out = store.root / "report"
    comparison = cmp.compare(store.uri, out_dir=out)

    assert set(comparison.files) == {"csv", "paired", "methods", "grid", "plot", "html"}
    for name in (cmp.CSV_NAME, cmp.PLOT_NAME, cmp.HTML_NAME):
        assert (out / name).is_file()
    with Image.open(out / cmp.PLOT_NAME) as plot:
        assert plot.format == "PNG"
        assert plot.width > 300

    page = (out / cmp.HTML_NAME).read_text(encoding="utf-8")
    assert "data:image/png;base64," in page
    assert _b64((out / cmp.PLOT_NAME).read_bytes()) in page
    sources = re.findall(r"""\ssrc\s*=\s*["']?([^"' >]+)""", page, flags=re.IGNORECASE)
    assert sources, "the report should embed images"
    assert all(s.startswith("data:image/png;base64,") for s in sources), sources
    links = re.findall(r"""\shref\s*=\s*["']?([^"' >]+)""", page, flags=re.IGNORECASE)
    assert links  # each gallery image links to its run in the MLflow UI, nothing else is loaded
    run_link = (
        r"http://127\.0\.0\.1:5000/#/experiments/\d+/runs/\w+\?workflowType=machine_learning$"
    )
    assert all(re.match(run_link, u) for u in links)
    assert "<script" not in page.lower()
    assert "<link" not in page.lower()
    # escaped, never raw HTML from run or image names
    assert "run <one>" not in page
    assert "run &lt;one&gt;" in page
    assert "photo &lt;b&gt;.jpg" in page

    # per setting, best then worst: top 0.1 (the first run): 0.95 img4, 0.9 img1, 0.6 img5,
    # then 0.01, 0.05 img0, 0.3 img3; top 0.3 (run-two, two images): img0, then img9
    shown = [
        *[(first, stem) for stem in ("img4", "img1", "img5", "photo__b_", "img0", "img3")],
        (second, "img0"),
        (second, "img9"),
    ]
    at = [page.index(_b64(run.overlays[stem])) for run, stem in shown]
    assert at == sorted(at)
    for run, stem in [(first, "img2"), (first, "img6")]:  # the middle is left out
        assert _b64(run.overlays[stem]) not in page
    assert page.count("<figure>") == 8
    assert page.count('<section class="setting">') == 2
    assert "IoU 0.950" in page
    assert "run-two" in page


def test_overlays_are_found_without_an_artifact_stem_column(tracking_store):
    """Older results.csv files have no artifact_stem: the stem is derived from the image name."""
    store = tracking_store
    client = store.client
    run_id = client.create_run(store.experiment_id, run_name="old").info.run_id
    client.log_param(run_id, "method.name", "gradcam")
    files = store.root / "old-run"
    (files / "overlays").mkdir(parents=True)
    png = tiny_png((1, 2, 3))
    (files / "overlays" / "my_cat.png").write_bytes(png)  # "my cat.jpg" -> stem "my_cat"
    client.log_artifacts(run_id, str(files / "overlays"), "overlays")
    (files / "results.csv").write_text("image,status,iou\nmy cat.jpg,ok,0.8\nlost dog.png,ok,0.1\n")
    client.log_artifact(run_id, str(files / "results.csv"))
    client.set_terminated(run_id)

    comparison = cmp.compare(store.uri, out_dir=store.root / "out")
    page = (store.root / "out" / cmp.HTML_NAME).read_text(encoding="utf-8")
    assert _b64(png) in page
    assert page.count("overlay not available") == 1  # lost dog has no overlay
    row = comparison.table.iloc[0]
    assert (row["method"], row["images"], row["mean_iou"]) == ("gradcam", 2, pytest.approx(0.45))
    assert pd.isna(row["cam_top_fraction"])  # no threshold param: still one row


def test_parent_scope_compares_children_and_logs_files_to_parent(tracking_store, make_study_run):
    store = tracking_store
    parent = _sweep_parent(store)
    for fraction, iou in [(0.1, 0.3), (0.2, 0.6)]:
        make_study_run(
            store.client, store.experiment_id, [FakeImage("a", iou)],
            cam_top_fraction=fraction, parent_run_id=parent,
        )  # fmt: skip
    make_study_run(store.client, store.experiment_id, [FakeImage("a", 0.99)], method="eigencam")

    out = store.root / "parent-out"
    comparison = cmp.compare(store.uri, parent_run_id=parent, out_dir=out)
    assert comparison.table["method"].tolist() == ["gradcam", "gradcam"]
    assert comparison.table["mean_iou"].tolist() == pytest.approx([0.3, 0.6])

    logged = {f.path for f in store.client.list_artifacts(parent, "comparison")}
    assert logged == {
        "comparison/comparison.csv",
        "comparison/iou_per_image.csv",
        "comparison/paired.csv",
        "comparison/method_agreement.csv",
        "comparison/iou_vs_threshold.png",
        "comparison/report.html",
    }
    downloaded = store.client.download_artifacts(
        parent, "comparison/report.html", str(store.root / "dl")
    )
    assert Path(downloaded).read_bytes() == (out / "report.html").read_bytes()


@pytest.mark.parametrize("with_sweep_dir", [True, False], ids=["sweep-dir", "temp-dir"])
def test_log_comparison_to_parent_for_the_sweep_callback(
    tracking_store, make_study_run, with_sweep_dir
):
    store = tracking_store
    parent = RunLogger.start(store.client, store.experiment_id, "sweep y", {"role": "sweep"})
    for name, iou in (("a", 0.2), ("b", 0.4)):
        make_study_run(
            store.client, store.experiment_id, [FakeImage(name, iou)], parent_run_id=parent.run_id
        )
    children = store.client.search_runs(
        [store.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.run_id}'"
    )
    sweep_dir = store.root / "multirun" / "sweep" if with_sweep_dir else None

    comparison = cmp.log_comparison_to_parent(parent, list(children), sweep_dir)

    row = comparison.table.iloc[0]
    assert (row["runs"], row["mean_iou"]) == (2, pytest.approx(0.3))
    logged = {f.path for f in store.client.list_artifacts(parent.run_id, "comparison")}
    assert len(logged) == 6
    if sweep_dir is not None:
        assert sorted(p.name for p in (sweep_dir / "comparison").iterdir()) == [
            "comparison.csv", "iou_per_image.csv", "iou_vs_threshold.png", "method_agreement.csv",
            "paired.csv", "report.html",
        ]  # fmt: skip


def test_log_comparison_to_parent_without_children_raises(tracking_store):
    parent = RunLogger.start(
        tracking_store.client, tracking_store.experiment_id, "sweep z", {"role": "sweep"}
    )
    with pytest.raises(cmp.CompareError, match="no study runs"):
        cmp.log_comparison_to_parent(parent, [], None)


# --------------------------------------------------------------------------- command line


def test_cli_prints_table_and_writes_files(tracking_store, make_study_run, capsys):
    store = tracking_store
    make_study_run(store.client, store.experiment_id, [FakeImage("a", 0.25), FakeImage("b", 0.75)])
    code = main(["compare", "--tracking-uri", store.uri, "--out", str(store.root / "cli-out")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "mean_iou" in captured.out
    assert "0.500" in captured.out
    assert "report.html" in captured.out
    assert (store.root / "cli-out" / "report.html").is_file()


def test_cli_defaults_read_mlflow_db_in_the_working_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["compare"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [err.strip()]
    assert "sqlite:///mlflow.db not found" in err
    assert not (tmp_path / "mlflow.db").exists()  # no empty store is created


def test_cli_reports_experiment_without_runs(tracking_store, capsys):
    code = main(["compare", "--tracking-uri", tracking_store.uri])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert "no study runs" in err


def test_cli_reports_unknown_parent(tracking_store, capsys):
    code = main(["compare", "--tracking-uri", tracking_store.uri, "--parent", "0" * 32])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert "not found" in err


def test_cli_missing_experiment_exits_2_with_one_line(tracking_store, make_study_run):
    make_study_run(tracking_store.client, tracking_store.experiment_id, [FakeImage("a", 0.5)])
    result = _cli(
        "--tracking-uri", tracking_store.uri, "--experiment", "nope", cwd=tracking_store.root
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("xai-exp compare: experiment 'nope' not found")
    assert "'xai-exp'" in lines[0]  # names the experiments that exist
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_cli_unreachable_server_exits_2_quickly(tmp_path, free_port):
    started = time.monotonic()
    result = _cli("--tracking-uri", f"http://127.0.0.1:{free_port}", cwd=tmp_path, timeout=90)
    elapsed = time.monotonic() - started
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"http://127.0.0.1:{free_port} is unreachable" in lines[0]
    assert "Traceback" not in result.stderr
    assert elapsed < 60


def test_cli_never_prints_a_password_from_the_uri(free_port, capsys):
    code = main(["compare", "--tracking-uri", f"http://alice:s3cret@127.0.0.1:{free_port}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "s3cret" not in err
    assert f"http://alice:***@127.0.0.1:{free_port}" in err


# --------------------------------------------------------------------------- real sweep


@pytest.mark.slow
def test_real_sweep_logs_comparison_to_its_parent(tmp_path, tiny_study_overrides):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep_dir = tmp_path / "multirun"
    command = [
        sys.executable, str(RUN_PY), "-m", "threshold=top5,top10", "method=gradcam",
        *tiny_study_overrides, f"tracking.uri={uri}", f"hydra.sweep.dir={sweep_dir}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "could not log the sweep comparison" not in result.stderr

    parent_id = json.loads((sweep_dir / "mlflow_parent.json").read_text())["run_id"]
    names = (
        cmp.CSV_NAME,
        cmp.PAIRED_NAME,
        cmp.MATRIX_NAME,
        cmp.GRID_NAME,
        cmp.PLOT_NAME,
        cmp.HTML_NAME,
    )
    for name in names:
        assert (sweep_dir / "comparison" / name).is_file()
    client = open_store(uri)
    logged = {f.path for f in client.list_artifacts(parent_id, "comparison")}
    assert logged == {f"comparison/{n}" for n in names}

    table = pd.read_csv(sweep_dir / "comparison" / cmp.CSV_NAME)
    assert sorted(table["cam_top_fraction"]) == [0.05, 0.1]
    assert table["runs"].tolist() == [1, 1]
    assert table["images"].tolist() == [2, 2]
    children = client.search_runs(
        [client.get_run(parent_id).info.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
    )
    by_fraction = {
        float(c.data.params["threshold.cam_top_fraction"]): c.data.metrics["mean_iou"]
        for c in children
    }
    for _, row in table.iterrows():
        assert row["mean_iou"] == pytest.approx(by_fraction[row["cam_top_fraction"]])
    page = (sweep_dir / "comparison" / cmp.HTML_NAME).read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") >= 1 + 4  # plot + 4 overlays (2 runs x 2)
    assert "overlay not available" not in page
    assert not math.isnan(table["mean_iou"].iloc[0])


def test_metrics_beyond_iou_are_averaged_side_by_side(tracking_store, tmp_path):
    client, experiment_id = tracking_store.client, tracking_store.experiment_id
    run = RunLogger.start(client, experiment_id, "metrics", {})
    run.log_params(
        {
            "method.name": "gradcam",
            "threshold.cam_top_fraction": 0.1,
            "threshold.lime_mode": "top_k",
            "lime.num_samples": 100,
        }
    )
    rows = [
        {"image": "a", "status": "ok", "iou": 0.2, "spearman": 0.5, "cam_deletion_auc": 0.1},
        {"image": "b", "status": "ok", "iou": 0.4, "spearman": -0.1, "cam_deletion_auc": 0.3},
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    run.log_artifact(tmp_path / "results.csv")
    run.finish()
    runs = [client.get_run(run.run_id)]
    images = cmp.collect_images(client, runs, tmp_path / "work")
    [row] = cmp.summarize_groups(runs, images).to_dict("records")
    assert row["mean_spearman"] == pytest.approx(0.2)
    assert row["mean_cam_deletion_auc"] == pytest.approx(0.2)
    assert "mean_randomisation_rho" not in row  # not computed by these runs: no column
