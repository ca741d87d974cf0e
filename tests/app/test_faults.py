"""Faults a cluster brings: signals, lost processes, cache and store failures, hopeless configs.

Each test injects one fault into a real `run.py` subprocess, a real sqlite store or the real
cache, and checks what the user finds afterwards.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import io
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import TINY_STUDY, restore_default_signals, start_interruptible, study_command
from mlflow.tracking import MlflowClient
from tiny_models import smooth_image, tiny_classifier

from xai_exp.app import cli
from xai_exp.app.hydra_app import compose_config
from xai_exp.app.job import JobContext, config_yaml, execute, logged_config
from xai_exp.cache import ExplanationCache
from xai_exp.config import ConfigError, LimeConfig, StudyConfig, TrackingConfig
from xai_exp.data.images import DataError, ImageItem
from xai_exp.evaluate.results import ImageResult
from xai_exp.outputs import plots
from xai_exp.outputs.writer import ResultsWriter
from xai_exp.study.pipeline import Study, run_study
from xai_exp.track.runs import (
    HEARTBEAT_TAG,
    STALE_AFTER_S,
    RunLogger,
    TrackingError,
    flatten,
    mark_lost_runs,
    process_tags,
)

# --------------------------------------------------------------------------- helpers


def store(tmp_path: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")


def study_runs(tmp_path: Path) -> list:
    client = store(tmp_path)
    experiment = client.get_experiment_by_name("xai-exp")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def start_study(tmp_path: Path, *overrides: str, multirun: bool = False) -> subprocess.Popen:
    args = study_command(tmp_path, *TINY_STUDY, *overrides, multirun=multirun)
    return start_interruptible(args, tmp_path, text=True)


def wait_for_finished_images(tmp_path: Path, process: subprocess.Popen, rows: int) -> None:
    """Wait until some results.csv of the run has `rows` image rows."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        for found in tmp_path.glob("*/**/results.csv"):
            if len(found.read_text().splitlines()) > rows:
                return
        time.sleep(0.3)
    raise AssertionError(f"no {rows} images finished in time: {process.communicate()[1]}")


def run_study_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = study_command(tmp_path, *TINY_STUDY, *overrides)
    return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def one_line_error(done: subprocess.CompletedProcess, prefix: str = "xai-exp") -> str:
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, done.stderr
    return lines[0]


def artifact_text(client: MlflowClient, run_id: str, path: str, tmp_path: Path) -> str:
    return Path(client.download_artifacts(run_id, path, str(tmp_path / "dl" / run_id))).read_text()


# --------------------------------------------------------------------------- 1. signals


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_termination_signal_ends_the_run_like_ctrl_c(tmp_path, sig):
    process = start_study(tmp_path, "data.limit=6", "lime.num_samples=3000")
    wait_for_finished_images(tmp_path, process, rows=1)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + sig
    assert f"interrupted (received {sig.name})" in stderr
    [run] = study_runs(tmp_path)
    assert run.info.status == "KILLED"
    assert f"marked KILLED (Terminated: received {sig.name})" in stdout + stderr  # and it is
    assert sig.name in run.data.tags["error"]
    text = artifact_text(store(tmp_path), run.info.run_id, "results.csv", tmp_path)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert 1 <= len(rows) < 6  # the images finished before the signal are kept


@pytest.mark.slow
def test_sigterm_closes_a_sweep_parent_with_its_comparison(tmp_path):
    process = start_study(
        tmp_path,
        "lime.num_samples=3000",
        "lime.seed=range(0,40)",  # every job recomputes LIME: the sweep far outlasts the signal
        multirun=True,
    )
    deadline = time.monotonic() + 240
    finished = []
    while time.monotonic() < deadline and not finished and process.poll() is None:
        time.sleep(1)
        if list((tmp_path / "multirun").rglob("mlflow_parent.json")):
            finished = [r for r in study_runs(tmp_path) if r.info.status == "FINISHED"]
    assert finished, "no sweep job finished in time"
    assert process.poll() is None, "the sweep ended before the signal: make its jobs slower"
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=180)
    assert process.returncode == 128 + signal.SIGTERM
    runs = study_runs(tmp_path)
    [parent] = [r for r in runs if r.data.tags.get("role") == "sweep"]
    assert parent.info.status == "KILLED"
    assert "RUNNING" not in {r.info.status for r in runs}
    logged = {a.path for a in store(tmp_path).list_artifacts(parent.info.run_id, "comparison")}
    assert "comparison/report.html" in logged  # logged while MLflow still worked


@pytest.mark.slow
def test_second_interrupt_during_cleanup_still_closes_the_run(tmp_path):
    process = start_study(tmp_path, "data.limit=6", "lime.num_samples=3000")
    wait_for_finished_images(tmp_path, process, rows=1)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=120)
    assert process.returncode != 0
    [run] = study_runs(tmp_path)
    assert run.info.status in {"KILLED", "FAILED"}  # never left RUNNING


# --------------------------------------------------------------------------- 2. lost processes


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_runs_of_processes_that_are_gone_are_marked_failed(tracking_store):
    client, experiment = tracking_store.client, tracking_store.experiment_id
    lost = RunLogger.start(client, experiment, "lost", {})
    client.set_tag(lost.run_id, "process.pid", str(_dead_pid()))
    alive = RunLogger.start(client, experiment, "alive", {})  # this very process
    elsewhere = RunLogger.start(client, experiment, "elsewhere", {})
    client.set_tag(elsewhere.run_id, "process.host", "another-node")

    assert mark_lost_runs(client, [experiment]) == [lost.run_id]
    found = client.get_run(lost.run_id)
    assert found.info.status == "FAILED"
    assert found.data.tags["error"].startswith("process lost")
    assert client.get_run(alive.run_id).info.status == "RUNNING"
    assert client.get_run(elsewhere.run_id).info.status == "RUNNING"  # cannot tell from here
    assert process_tags()["process.host"] == socket.gethostname()


def test_a_live_run_in_another_pid_namespace_is_judged_by_its_heartbeat(tracking_store):
    """A run in a container with its own PID namespace (Apptainer --containall) has a pid that
    means nothing here: its fresh heartbeat keeps it open, a stale one marks it lost."""
    client, experiment = tracking_store.client, tracking_store.experiment_id
    runs = {}
    for name, beat_age in (("container-alive", 5), ("container-lost", STALE_AFTER_S + 60)):
        runs[name] = RunLogger.start(client, experiment, name, {})
        client.set_tag(runs[name].run_id, "process.pid", str(_dead_pid()))  # a pid of theirs
        client.set_tag(runs[name].run_id, "process.pid_namespace", "pid:[1]")
        client.set_tag(runs[name].run_id, HEARTBEAT_TAG, str(int(time.time() - beat_age)))
    node = RunLogger.start(client, experiment, "other-node-lost", {})
    client.set_tag(node.run_id, "process.host", "another-node")
    client.set_tag(node.run_id, HEARTBEAT_TAG, str(int(time.time() - STALE_AFTER_S - 60)))

    lost = mark_lost_runs(client, [experiment])
    assert sorted(lost) == sorted([runs["container-lost"].run_id, node.run_id])
    assert client.get_run(runs["container-alive"].run_id).info.status == "RUNNING"
    assert client.get_run(runs["container-lost"].run_id).info.status == "FAILED"
    tags = process_tags()
    assert tags["process.pid_namespace"].startswith("pid:[")
    assert int(tags[HEARTBEAT_TAG]) == pytest.approx(time.time(), abs=5)


def test_an_open_run_renews_its_heartbeat_until_it_finishes(tracking_store):
    client, experiment = tracking_store.client, tracking_store.experiment_id
    run = RunLogger.start(client, experiment, "beating", {}, heartbeat_s=0.2)
    client.set_tag(run.run_id, HEARTBEAT_TAG, "0")  # as if long ago
    deadline = time.time() + 20
    while client.get_run(run.run_id).data.tags[HEARTBEAT_TAG] == "0" and time.time() < deadline:
        time.sleep(0.1)
    assert int(client.get_run(run.run_id).data.tags[HEARTBEAT_TAG]) >= time.time() - 10
    shipped = pickle.loads(pickle.dumps(run))  # as a joblib sweep ships its callback
    assert (shipped.run_id, shipped.experiment_id) == (run.run_id, run.experiment_id)
    run.finish()
    time.sleep(0.5)  # any beat in flight lands
    client.set_tag(run.run_id, HEARTBEAT_TAG, "0")
    time.sleep(1.0)  # five periods: a beating run would have renewed it
    assert client.get_run(run.run_id).data.tags[HEARTBEAT_TAG] == "0"


@pytest.mark.slow
def test_kill_9_leaves_a_run_that_the_next_command_marks_failed(tmp_path):
    process = start_study(tmp_path, "data.limit=6", "lime.num_samples=3000")
    wait_for_finished_images(tmp_path, process, rows=1)
    process.kill()
    process.communicate(timeout=60)
    [run] = study_runs(tmp_path)
    assert run.info.status == "RUNNING"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "xai_exp",
            "compare",
            "--tracking-uri",
            f"sqlite:///{tmp_path}/mlflow.db",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    [run] = study_runs(tmp_path)
    assert run.info.status == "FAILED"
    assert "process lost" in run.data.tags["error"]
    assert "process lost" in done.stderr
    assert "unfinished_runs" in done.stdout
    table = (tmp_path / "comparison" / "comparison.csv").read_text().splitlines()
    header, row = table[0].split(","), table[1].split(",")
    assert row[header.index("runs")] == "0"  # left out of the means
    assert row[header.index("unfinished_runs")] == "1"


# --------------------------------------------------------------------------- 4-5. the cache


def _item(name: str, seed: int) -> ImageItem:
    return ImageItem(name, name, smooth_image(seed=seed), f"hash-{name}", name)


def _config() -> StudyConfig:
    lime = LimeConfig(num_samples=40, batch_size=16, hide_color=0)  # LIME weights that rank
    lime.segmentation.algorithm = "slic"
    lime.segmentation.params = {"n_segments": 16, "compactness": 10, "start_label": 0}
    return StudyConfig(lime=lime, progress=False)


def test_a_cache_that_cannot_be_written_is_a_warning_not_a_failure(tmp_path, caplog):
    not_a_folder = tmp_path / "cache-file"
    not_a_folder.write_text("a file where the cache folder should be")
    cache = ExplanationCache(not_a_folder)
    with caplog.at_level(logging.WARNING):
        study = Study(_config(), tiny_classifier(), cache)
        results = run_study(study, [_item("a", 2), _item("b", 6)], progress=False)
    healthy = Study(_config(), tiny_classifier(), ExplanationCache(tmp_path / "healthy"))
    expected = run_study(healthy, [_item("a", 2), _item("b", 6)], progress=False)
    assert [r.status for r in results] == ["ok", "ok"]
    assert [r.iou for r in results] == [r.iou for r in expected]  # every result still used
    assert cache.failed_writes == 8  # per image: prediction, CAM, superpixels, LIME
    warnings = [r for r in caplog.records if "cannot write to the explanation cache" in r.message]
    assert len(warnings) == 1  # one warning, not one per entry


def test_a_full_disk_while_caching_keeps_the_result(tmp_path, monkeypatch):
    import errno

    def full_disk(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    cache = ExplanationCache(tmp_path / "cache")
    [result] = run_study(
        Study(_config(), tiny_classifier(), cache), [_item("a", 2)], progress=False
    )
    assert result.status == "ok"
    assert result.iou is not None
    assert cache.failed_writes == 4  # prediction, CAM, superpixels, LIME
    assert not list((tmp_path / "cache").rglob("*.npz"))  # no half-written entry either


def test_an_entry_of_the_wrong_shape_is_discarded_and_recomputed(tmp_path):
    cache = ExplanationCache(tmp_path)
    classifier = tiny_classifier()
    [first] = run_study(Study(_config(), classifier, cache), [_item("a", 2)], progress=False)
    [entry] = (tmp_path / "cam").rglob("*.npz")
    key = entry.stem
    cache.store("cam", key, {"cam": np.zeros((3, 3), np.float32)}, {"seconds": 1.0})  # valid sum
    again = Study(_config(), classifier, cache)
    [second] = run_study(again, [_item("a", 2)], progress=False)
    assert not second.cam_reused  # recomputed, not an error
    assert second.iou == first.iou
    assert cache.discarded == 1
    third = Study(_config(), classifier, cache)
    [reused] = run_study(third, [_item("a", 2)], progress=False)
    assert reused.cam_reused  # the recomputed entry replaced the bad one


def test_cache_entries_follow_the_umask(tmp_path):
    previous = os.umask(0o002)
    try:
        cache = ExplanationCache(tmp_path)
        cache.store("cam", "ab" * 32, {"cam": np.ones((2, 2))}, {"seconds": 0.1})
    finally:
        os.umask(previous)
    [entry] = tmp_path.rglob("*.npz")
    assert entry.stat().st_mode & 0o777 == 0o664  # group-readable and -writable


# --------------------------------------------------------------------------- 6. store creation


def test_concurrent_first_starts_in_a_fresh_folder_all_succeed(tmp_path):
    code = (
        "import sys; from xai_exp.track.runs import connect;"
        f"connect('sqlite:///{tmp_path}/mlflow.db', 'xai-exp'); print('ok')"
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=180) for p in processes]
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err
        assert out.strip() == "ok"
    assert len(store(tmp_path).search_experiments()) == 2  # Default and xai-exp, once each


# --------------------------------------------------------------------------- 7. hopeless runs


def _dead_resnet18(tmp_path: Path) -> Path:
    """A ResNet-18 checkpoint whose weights are all zero: every CAM is constant."""
    net = torchvision.models.resnet18(weights=None)
    state = {name: torch.zeros_like(value) for name, value in net.state_dict().items()}
    path = tmp_path / "dead.pt"
    torch.save(state, path)
    return path


@pytest.mark.slow
def test_a_run_where_no_image_could_be_compared_fails(tmp_path):
    done = run_study_cli(tmp_path, f"model.checkpoint={_dead_resnet18(tmp_path)}")
    assert done.returncode == 2
    assert "no image could be compared (2 flagged, 0 failed)" in one_line_error(done)
    [run] = study_runs(tmp_path)
    assert run.info.status == "FAILED"
    assert run.data.metrics["n_flagged"] == 2
    assert "results.csv" in {a.path for a in store(tmp_path).list_artifacts(run.info.run_id)}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["lime.seed=-1"], "lime.seed=-1 must be in 0..4294967295"),
        (["model.target_layer=fc"], "model.target_layer='fc' outputs (1, 1000)"),
        (["model.target_layer=avgpool"], "a 1 x 1 map"),
        (["lime.segmentation.params.kernel_size=abc"], "kernel_size='abc' must be a number"),
        (["+lime.segmentation.params.n_segments=5"], "quickshift takes no 'n_segments'"),
        (["lime.num_samples=100000000"], "lime.num_samples=100000000 must be in 1..100000"),
        (
            ["model.input_size=100000"],
            "model.input_size=100000 must be null (the model's own) or 8..2048",
        ),
        (["data=folder", "data.dir=/nonexistent/photos"], "data folder not found"),
    ],
)
def test_configs_that_would_fail_every_image_are_refused_before_any_run(
    tracking_store, tmp_path, overrides, expected
):
    store, cache = f"tracking.uri={tracking_store.uri}", f"cache.dir={tmp_path / 'cache'}"
    cfg = compose_config([*TINY_STUDY, store, cache, *overrides])
    with pytest.raises((ConfigError, DataError)) as refused:
        execute(cfg, JobContext(output_dir=tmp_path / "out"))
    assert expected in str(refused.value)
    assert "\n" not in str(refused.value)  # one line
    assert tracking_store.client.search_runs([tracking_store.experiment_id]) == []
    assert not (tmp_path / "cache").exists()  # refused before any compute


# --------------------------------------------------------------------------- 8. tracking URIs


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("file:///{tmp}/mlruns", "cannot be used"),
        ("foo://bar", "cannot be used"),
        ("sqlite:///{tmp}/not-a-database.txt", "file is not a database"),
        ("sqlite:///{tmp}/not-a-database.txt/mlflow.db", "cannot be used"),
    ],
)
def test_unusable_tracking_uris_are_one_line_in_run_and_compare(tmp_path, capsys, uri, expected):
    (tmp_path / "not-a-database.txt").write_text("plain text, not sqlite")
    uri = uri.format(tmp=tmp_path)
    cfg = compose_config([*TINY_STUDY, f"tracking.uri={uri}"])
    with pytest.raises(TrackingError) as refused:
        execute(cfg, JobContext(output_dir=tmp_path / "out"))
    assert expected in str(refused.value)
    assert "\n" not in str(refused.value)
    assert cli.main(["compare", "--tracking-uri", uri]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("xai-exp compare: ")


@pytest.mark.slow
def test_an_unusable_tracking_uri_is_one_line_from_the_command(tmp_path):
    done = run_study_cli(tmp_path, "tracking.uri=foo://bar")
    assert done.returncode == 2
    assert "tracking store foo://bar cannot be used" in one_line_error(done)


def test_passwords_in_tracking_uris_are_never_logged():
    cfg = StudyConfig(tracking=TrackingConfig(uri="http://ana:s3cret@mlflow.lab:5000"))
    params = flatten(dataclasses.asdict(logged_config(cfg)))
    assert params["tracking.uri"] == "http://ana:***@mlflow.lab:5000"
    assert "s3cret" not in str(params) + config_yaml(logged_config(cfg))
    assert cfg.tracking.uri.endswith("s3cret@mlflow.lab:5000")  # the run itself still uses it


@pytest.mark.slow
def test_passwords_in_tracking_uris_are_not_printed(tmp_path, free_port):
    done = run_study_cli(tmp_path, f"tracking.uri=http://ana:s3cret@127.0.0.1:{free_port}")
    assert done.returncode == 2
    assert "s3cret" not in done.stderr + done.stdout
    assert "ana:***@" in one_line_error(done)


# --------------------------------------------------------------------------- 9. file names


def test_image_names_are_never_markup_and_csv_cells_are_inert(tmp_path):
    classifier = tiny_classifier()
    names = ["x$_$y", "=HYPERLINK(1)", "$\\frac{a}{$"]
    items = [
        ImageItem(name, f"stem{i}", smooth_image(seed=i), f"h{i}", name)
        for i, name in enumerate(names)
    ]
    writer = ResultsWriter(tmp_path, "gradcam")
    study = Study(_config(), classifier, ExplanationCache(tmp_path / "c"))
    results = run_study(study, items, on_result=writer, progress=False)
    assert "error" not in [r.status for r in results]  # the overlays' titles drew
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 3
    plots.save_figure(plots.iou_bar_chart(results, "gradcam"), tmp_path / "bars.png")
    rows = list(csv.DictReader((tmp_path / "results.csv").open(encoding="utf-8")))
    assert [r["image"] for r in rows] == ["x$_$y", "'=HYPERLINK(1)", "$\\frac{a}{$"]
    assert rows[1]["artifact_stem"] == "stem1"


def test_overlay_title_shows_dollar_signs_as_typed():
    result = ImageResult("x$_$y", "x", predicted_label="a $5 bill", probability=0.5)
    result.arrays["image"] = np.zeros((8, 8, 3), np.uint8)
    figure = plots.overlay_figure(result, "gradcam")
    figure.canvas.draw()  # mathtext would raise here
    assert "x\\$_\\$y" in figure.get_suptitle()


def test_ctrl_c_while_a_finished_run_is_closed_closes_it_then_stops(
    tracking_store, tmp_path, monkeypatch
):
    closing = RunLogger.finish

    def finish_under_ctrl_c(self, status="FINISHED"):
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C as the run closes
        time.sleep(0.05)
        closing(self, status)

    monkeypatch.setattr(RunLogger, "finish", finish_under_ctrl_c)
    cfg = compose_config(
        [*TINY_STUDY, f"tracking.uri={tracking_store.uri}", f"cache.dir={tmp_path / 'cache'}"]
    )
    with pytest.raises(KeyboardInterrupt):  # not swallowed: a sweep stops at the first press
        execute(cfg, JobContext(output_dir=tmp_path / "out"))
    [run] = tracking_store.client.search_runs([tracking_store.experiment_id])
    assert run.info.status == "FINISHED"  # closed first, with the status it had earned


def test_a_ctrl_c_that_an_error_replaced_still_stops_the_job_killed(
    tracking_store, tmp_path, monkeypatch
):
    """Python ignores an interrupt raised in a finaliser ("Exception ignored in ..."), and the
    code it cut short can fail later with an ordinary error (a pool or connection left half
    closed): the job still ends as the Ctrl-C, KILLED and interrupted, not FAILED."""
    from xai_exp.app import signals
    from xai_exp.outputs.writer import ResultsWriter

    def write_under_ctrl_c(self, index, result):
        with contextlib.suppress(KeyboardInterrupt):  # as in a finaliser: printed, ignored
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        raise RuntimeError("cannot operate on a closed database")  # what it broke

    monkeypatch.setattr(ResultsWriter, "__call__", write_under_ctrl_c)
    cfg = compose_config(
        [*TINY_STUDY, f"tracking.uri={tracking_store.uri}", f"cache.dir={tmp_path / 'cache'}"]
    )
    signals.install()
    try:
        with pytest.raises(KeyboardInterrupt) as stopped, signals.interruptible():
            execute(cfg, JobContext(output_dir=tmp_path / "out"))
    finally:
        restore_default_signals()
    assert isinstance(stopped.value.__cause__, RuntimeError)  # the error is kept as the cause
    [run] = tracking_store.client.search_runs([tracking_store.experiment_id])
    assert run.info.status == "KILLED"
    assert run.data.tags["error"].startswith("KeyboardInterrupt")


def test_an_interrupt_while_a_run_is_created_arrives_after_it():
    from xai_exp.app import signals

    finished: list[str] = []

    def create_run() -> None:
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            finished.append("run created")  # the block is not cut in half

    signals.install()
    try:
        with pytest.raises(signals.Terminated, match="SIGTERM"):
            create_run()
        assert finished == ["run created"]
        with signals.shielded():
            os.kill(os.getpid(), signal.SIGINT)  # ignored: cleanup goes on
            time.sleep(0.05)
            finished.append("cleaned up")
        assert finished[-1] == "cleaned up"
    finally:
        restore_default_signals()


def job_free_press(sig: int) -> None:
    """Send `sig` to this process outside any job and give it time to land."""
    os.kill(os.getpid(), sig)
    time.sleep(1)


def test_a_signal_between_jobs_waits_for_the_next_job_and_interrupts_inside_one():
    from xai_exp.app import signals

    ran: list[str] = []

    def job(send: int | None = None) -> None:
        with signals.interruptible():
            if send is not None:
                os.kill(os.getpid(), send)
                time.sleep(1)
            ran.append("to the end")

    signals.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # in Hydra's code between two jobs
        time.sleep(0.05)  # nothing raised here
        with pytest.raises(signals.Terminated, match="SIGTERM"):
            job()  # the next job stops as it starts
        with pytest.raises(KeyboardInterrupt):
            job(signal.SIGINT)  # inside a job: at once
        assert ran == []
        os.kill(os.getpid(), signal.SIGHUP)  # after the last job
        time.sleep(0.05)
        with pytest.raises(signals.Terminated, match="SIGHUP"):
            signals.raise_pending()
        signals.raise_pending()  # raised once
        os.kill(os.getpid(), signal.SIGTERM)  # outside a job, waiting ...
        time.sleep(0.05)
        with pytest.raises(KeyboardInterrupt):
            job_free_press(signal.SIGINT)  # ... and pressed again: at once
        signals.raise_pending()  # nothing left over
    finally:
        restore_default_signals()


# --------------------------------------------------------------------------- a full output folder


def test_a_full_output_folder_costs_the_files_not_the_study(tmp_path, monkeypatch, caplog):
    from conftest import drawn_result

    from xai_exp.outputs.writer import write_run_files

    (tmp_path / "results.csv").symlink_to("/dev/full")  # every write: ENOSPC from the kernel
    real_save = plots.save_figure

    def save(figure, path, dpi=plots.DPI):
        if path.stem == "b":  # the disk fills up at one overlay only
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(figure, path, dpi)

    monkeypatch.setattr(plots, "save_figure", save)
    seen: list[int] = []
    with caplog.at_level(logging.WARNING, logger="xai_exp"):
        writer = ResultsWriter(tmp_path, "gradcam", on_image=lambda i, r: seen.append(i))
        for index, stem in enumerate("abc"):
            result = drawn_result(0.2 + index / 10)
            result.name = result.artifact_stem = stem
            writer(index, result)
        files = write_run_files(writer, {}, {"mean_iou": 0.3}, [])
    assert seen == [0, 1, 2]  # every image went on to MLflow
    assert [r.name for r in writer.results] == ["a", "b", "c"]
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == ["a.png", "c.png"]
    assert tmp_path / "results.csv" not in files
    assert (tmp_path / "summary.json") in files
    assert writer.unwritten_line() == (
        f"could not write 2 file(s) in {tmp_path}: results.csv (3 rows missing), overlays/b.png"
    )
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "No space left on device" in warnings[0].getMessage()


def test_an_output_folder_under_a_file_is_one_line_and_exit_code_2(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    done = subprocess.run(
        study_command(tmp_path, *TINY_STUDY, f"hydra.run.dir={blocker}/run"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        f"xai-exp: cannot write the output folder {blocker}/run (hydra.run.dir): Not a directory; "
        "set hydra.run.dir=PATH to a writable folder"
    )


def test_an_interrupt_python_ignored_is_raised_again_at_the_next_check():
    """A signal's interrupt raised while Python runs a finaliser or weakref callback is printed
    and ignored; `signals.check` (the job calls it after each image) raises it again."""
    from xai_exp.app import signals

    def swallowed_press() -> None:  # as Python does: "Exception ignored in ...", and go on
        with contextlib.suppress(signals.Terminated):
            job_free_press(signal.SIGTERM)

    signals.install()
    try:
        with signals.interruptible():
            swallowed_press()
            with pytest.raises(signals.Terminated, match="SIGTERM"):
                signals.check()
        signals.check()  # the block is closed: nothing left to raise
    finally:
        restore_default_signals()
