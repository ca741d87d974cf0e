"""End to end: `python run.py` against a real sqlite MLflow store in tmp_path."""

import csv
import io
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_STUDY as TINY
from conftest import start_interruptible, study_command
from mlflow.tracking import MlflowClient


def run_cli(tmp_path: Path, *overrides: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run run.py from tmp_path (not the repo), with its own store and cache."""
    args = study_command(tmp_path, *overrides)
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    env.pop("HYDRA_FULL_ERROR")
    return subprocess.run(
        args, cwd=tmp_path, capture_output=True, text=True, timeout=timeout, env=env
    )


def runs(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("xai-exp")
    if experiment is None:
        return client, []
    return client, client.search_runs([experiment.experiment_id])


@pytest.mark.slow
def test_run_logs_params_metrics_and_artifacts(tmp_path):
    done = run_cli(tmp_path, *TINY)
    assert done.returncode == 0, done.stderr
    client, [run] = runs(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.info.run_name.startswith("bundled/resnet18-random-init/gradcam-top10%-lime30@")
    assert "output folder" in done.stdout  # where to look, printed at the end
    assert run.info.run_id in done.stdout
    assert "Mean IoU **" in run.data.tags["mlflow.note.content"]
    assert run.data.tags["mlflow.source.git.commit"] == run.data.tags["git_commit"]
    assert run.data.tags["mlflow.source.name"] == "run.py"
    assert run.data.tags["mlflow.user"]
    params = run.data.params
    assert params["method.name"] == "gradcam"
    assert params["lime.num_samples"] == "30"
    assert params["threshold.cam_top_fraction"] == "0.1"
    assert params["model.arch"] == "resnet18"
    assert params["inference.engine"] == "auto"
    assert run.data.tags["inference_engine"] == "onnxruntime"  # auto on a CPU
    assert list((tmp_path / "cache" / "onnx").glob("*.onnx"))  # the graph, cached for reruns
    metrics = run.data.metrics
    assert 0 <= metrics["mean_iou"] <= 1
    assert {
        "median_iou",
        "mean_cam_seconds",
        "mean_reference_seconds",
        "mean_segmentation_seconds",
    } <= set(metrics)
    assert metrics["explanations_computed"] == 6
    history = client.get_metric_history(run.info.run_id, "per_image/iou")
    assert sorted(m.step for m in history) == [0, 1]
    tags = run.data.tags
    assert tags["model"] == "resnet18"
    assert tags["method"] == "gradcam"
    assert tags["device"] == "cpu"
    assert {"version.torch", "version.grad-cam", "version.lime"} <= set(tags)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {
        "config.yaml",
        "results.csv",
        "iou_bar_chart.png",
        "explanation_params.json",
        "results_table.json",
        "overlays",
    } <= artifacts
    overlays = {a.path for a in client.list_artifacts(run.info.run_id, "overlays")}
    assert overlays == {"overlays/astronaut.png", "overlays/chelsea.png"}
    local = client.download_artifacts(run.info.run_id, "results.csv", str(tmp_path / "dl"))
    rows = list(csv.DictReader(io.StringIO(Path(local).read_text())))
    assert [r["image"] for r in rows] == ["astronaut", "chelsea"]
    assert all(r["status"] == "ok" and 0 <= float(r["iou"]) <= 1 for r in rows)
    # outputs go to the working directory, not the repository
    assert list((tmp_path / "outputs").rglob("overlays/chelsea.png"))

    # the same config again reuses everything and gives identical IoU values
    again = run_cli(tmp_path, *TINY)
    assert again.returncode == 0, again.stderr
    client, both = runs(tmp_path)
    newest = max(both, key=lambda r: r.info.start_time)
    assert newest.data.metrics["explanations_computed"] == 0
    assert newest.data.metrics["explanations_reused"] == 6
    assert newest.data.metrics["mean_iou"] == metrics["mean_iou"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["threshold.cam_top_fraction=1.5"], "threshold.cam_top_fraction=1.5 must be in (0, 1]"),
        (["lime.num_samples=0"], "lime.num_samples=0 must be in 1..100000"),
        (["model.target_layer=layer5.-1"], "did you mean"),
        (["method.target_class=5000"], "method.target_class=5000 is out of range"),
        (["data=folder", "data.dir=/nonexistent/xai"], "/nonexistent/xai"),
        pytest.param(
            ["device=cuda"],
            "no CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present"),
        ),
    ],
)
def test_bad_config_is_one_line_and_leaves_no_finished_run(tmp_path, overrides, expected):
    done = run_cli(tmp_path, *TINY, *overrides, timeout=120)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("xai-exp:")]
    assert len(error_lines) == 1, done.stderr
    assert expected in error_lines[0]
    _, logged = runs(tmp_path)
    assert not [r for r in logged if r.info.status == "FINISHED"]


def test_unknown_method_lists_options(tmp_path):
    done = run_cli(tmp_path, "method=scorecma", timeout=120)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert "method=scorecma is not a method option; did you mean method=scorecam?" in line
    assert "gradcamplusplus" in line  # the options


def test_unreachable_tracking_server_fails_fast(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once we leave: nothing listens there
    started = time.monotonic()
    done = run_cli(tmp_path, *TINY, f"tracking.uri=http://127.0.0.1:{port}", timeout=120)
    assert done.returncode == 2
    assert f"http://127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 60
    assert not (tmp_path / "cache").exists()  # failed before any compute


@pytest.mark.slow
def test_ctrl_c_marks_the_run_killed_and_keeps_finished_images(tmp_path):
    args = study_command(tmp_path, *TINY, "data.limit=6", "lime.num_samples=3000")
    process = start_interruptible(args, tmp_path)
    deadline = time.monotonic() + 180
    csv_rows = 0
    while time.monotonic() < deadline and csv_rows < 2:
        time.sleep(0.5)
        found = list((tmp_path / "outputs").rglob("results.csv"))
        csv_rows = len(found[0].read_text().splitlines()) if found else 0
    assert csv_rows >= 2, "no image finished in time"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    client, [run] = runs(tmp_path)
    assert run.info.status == "KILLED", stderr
    local = client.download_artifacts(run.info.run_id, "results.csv", str(tmp_path / "dl"))
    assert len(Path(local).read_text().splitlines()) >= 2  # header + finished images


def mixed_folder(folder: Path) -> None:
    """Every kind of image a real folder holds, broken ones included."""
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "photo one.jpg")
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((40, 60), 128, np.uint8)])).save(folder / "alpha.png")
    Image.fromarray((rng.random((30, 30)) * 65535).astype(np.uint16)).save(folder / "deep16.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rgb).save(folder / "café's.png")
    Image.fromarray(rgb[:1, :1]).save(folder / "tiny.png")
    good = (folder / "photo one.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "notes.jpg").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    (folder / ".DS_Store").write_bytes(b"\x00\x01")


@pytest.mark.slow
def test_mixed_folder_explains_valid_images_and_names_broken_ones(tmp_path):
    mixed_folder(tmp_path / "images")
    tiny = [o for o in TINY if not o.startswith("data.limit")]
    done = run_cli(tmp_path, *tiny, "data=folder", f"data.dir={tmp_path / 'images'}")
    assert done.returncode == 0, done.stderr
    for name in ("truncated.jpg", "notes.jpg", "empty.png"):
        assert name in done.stdout + done.stderr  # one warning line each
    client, [run] = runs(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["n_skipped_files"] == 3
    assert run.data.metrics["n_images"] == 7
    assert run.data.metrics["n_failed"] == 0
    skipped = client.download_artifacts(run.info.run_id, "skipped_files.csv", str(tmp_path / "d"))
    rows = csv.DictReader(io.StringIO(Path(skipped).read_text()))
    assert {Path(row["path"]).name for row in rows} == {
        "truncated.jpg",
        "notes.jpg",
        "empty.png",
    }
    overlays = {a.path for a in client.list_artifacts(run.info.run_id, "overlays")}
    assert len(overlays) == 7
    assert all("/" not in p.removeprefix("overlays/") for p in overlays)
