"""Multirun sweeps: one parent run, named child runs, shared cache, failures kept apart."""

import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import TINY_STUDY as TINY
from conftest import start_interruptible, study_command
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


def sweep_args(tmp_path: Path, *overrides: str) -> list[str]:
    """`run.py -m` with the tiny study, its own store and cache in tmp_path."""
    return study_command(tmp_path, *TINY, *overrides, multirun=True)


def sweep(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = sweep_args(tmp_path, *overrides)
    return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=400)


def parents_and_children(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("xai-exp")
    every = client.search_runs([experiment.experiment_id]) if experiment else []
    parents = [r for r in every if r.data.tags.get("role") == "sweep"]
    children = [r for r in every if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def test_threshold_sweep_is_one_parent_with_named_children_and_no_recompute(tmp_path):
    done = sweep(tmp_path, "threshold=top5,top10,top20")
    assert done.returncode == 0, done.stderr
    _, [parent], children = parents_and_children(tmp_path)
    assert parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(c.info.run_name for c in children) == [  # the tiny model is random init
        "threshold=top10/random-init",
        "threshold=top20/random-init",
        "threshold=top5/random-init",
    ]
    for child in children:
        assert child.info.status == "FINISHED"
        assert Path(child.data.tags["sweep_dir"]).is_dir()
        assert child.data.tags["choice.threshold"] in {"top5", "top10", "top20"}
    # the three thresholds cost the explanations of one run: 3 per image, computed once
    assert sum(c.data.metrics["explanations_computed"] for c in children) == 6
    assert sum(c.data.metrics["explanations_reused"] for c in children) == 12
    ious = sorted(c.data.metrics["mean_iou"] for c in children)
    assert len(set(ious)) > 1  # thresholds do change the masks
    # the parent row in the runs table: its swept axis and its summary
    assert parent.data.params["swept.threshold"] == "top5,top10,top20"
    assert parent.data.metrics["best_mean_iou"] == pytest.approx(max(ious))
    assert parent.data.metrics["n_children"] == 3
    # the end block names the parent's page; the report's title what was compared
    assert f"/runs/{parent.info.run_id}?workflowType=machine_learning" in done.stdout
    report = Path(parent.data.tags["sweep_dir"]) / "comparison" / "report.html"
    title = "gradcam vs LIME: CAM top 5% vs 10% vs 20% on bundled, resnet18 (random weights)"
    assert f"<h1>{title}</h1>" in report.read_text(encoding="utf-8")

    rerun = sweep(tmp_path, "threshold=top5,top10,top20")
    assert rerun.returncode == 0, rerun.stderr
    _, parents, children = parents_and_children(tmp_path)
    assert len(parents) == 2
    newest = max(parents, key=lambda r: r.info.start_time)
    fresh = [c for c in children if c.data.tags["mlflow.parentRunId"] == newest.info.run_id]
    assert len(fresh) == 3
    assert sum(c.data.metrics["explanations_computed"] for c in fresh) == 0


def test_failing_job_fails_the_parent_but_keeps_the_others(tmp_path):
    done = sweep(tmp_path, "model.target_layer=layer4.-1,layer9")
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert "layer9" in done.stderr
    _, [parent], children = parents_and_children(tmp_path)
    assert parent.info.status == "FAILED"
    # the config error was refused before its run existed: the parent names it
    assert "model.target_layer=layer9" in parent.data.tags["failed_jobs"]
    assert "does not exist" in parent.data.tags["failed_jobs"]
    [good] = children
    assert good.info.run_name == "model.target_layer=layer4.-1/random-init"
    assert good.info.status == "FINISHED"
    assert 0 <= good.data.metrics["mean_iou"] <= 1


def test_joblib_launcher_runs_jobs_in_parallel_against_sqlite(tmp_path):
    done = sweep(
        tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "method=gradcam,hirescam"
    )
    assert done.returncode == 0, done.stderr
    _, [parent], children = parents_and_children(tmp_path)
    assert parent.info.status == "FINISHED"
    names = sorted(c.info.run_name for c in children)
    assert names == ["method=gradcam/random-init", "method=hirescam/random-init"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert all("mean_iou" in c.data.metrics for c in children)


def test_ctrl_c_closes_the_parent_and_keeps_finished_children(tmp_path):
    args = sweep_args(
        tmp_path,
        "lime.num_samples=3000",  # slow enough with ONNX Runtime to outlast Ctrl-C
        "lime.seed=range(0,40)",  # every job recomputes LIME: the sweep far outlasts Ctrl-C
    )
    process = start_interruptible(args, tmp_path)
    deadline = time.monotonic() + 240
    finished = []
    while time.monotonic() < deadline and not finished and process.poll() is None:
        time.sleep(1)
        # the parent marker exists once the sweep created its store: reading it is safe then
        if list((tmp_path / "multirun").rglob("mlflow_parent.json")):
            _, _, children = parents_and_children(tmp_path)
            finished = [c for c in children if c.info.status == "FINISHED"]
    assert finished, "no job finished in time"
    assert process.poll() is None, "the sweep ended before Ctrl-C: make its jobs slower"
    process.send_signal(signal.SIGINT)  # once, even when it lands while a run is being closed
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err.decode()[-3000:]
    _, [parent], children = parents_and_children(tmp_path)
    assert len(children) < 40  # the sweep stopped at the first Ctrl-C
    assert parent.info.status in {"KILLED", "FAILED"}
    statuses = [c.info.status for c in children]
    assert "FINISHED" in statuses
    assert "RUNNING" not in statuses


def test_a_random_cam_gains_raw_iou_with_the_threshold_but_no_agreement_above_chance(tmp_path):
    """RandomCAM knows nothing of LIME: raw IoU still rises with the CAM mask's area (chance
    does), while the agreement above chance stays near 0, and the comparison says so."""
    done = subprocess.run(
        study_command(
            tmp_path,
            "model=resnet18",
            "model.weights=null",
            "model.input_size=64",
            "model.target_layer=layer1.-1",  # a 16x16 map: random at a fine grain
            "data.limit=6",
            "lime.num_samples=30",
            "lime=slic",
            "lime.segmentation.params.n_segments=60",
            "progress=false",
            "method=randomcam",
            "threshold=top5,top10,top20",
            multirun=True,
        ),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _, [parent], children = parents_and_children(tmp_path)
    by_fraction = {
        float(c.data.params["threshold.cam_top_fraction"]): c.data.metrics for c in children
    }
    raw = [by_fraction[f]["mean_iou"] for f in (0.05, 0.1, 0.2)]
    chance = [by_fraction[f]["mean_iou_chance"] for f in (0.05, 0.1, 0.2)]
    above = [by_fraction[f]["mean_iou_corrected"] for f in (0.05, 0.1, 0.2)]
    assert raw[0] < raw[1] < raw[2]
    assert chance[0] < chance[1] < chance[2]
    assert above[2] <= above[0] + 0.01  # no gain above chance from a larger mask
    assert all(abs(value) < 0.1 for value in above)
    assert raw[2] - raw[0] > 0.5 * (chance[2] - chance[0])  # while raw IoU follows chance up
    assert "the raw ranking is mostly mask area" in parent.data.tags["mlflow.note.content"]
    assert parent.data.tags["best_setting"] != "cam_top_fraction=0.2"
    assert "best setting" in done.stdout
