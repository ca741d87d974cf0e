"""Shared pytest fixtures (generic; add your own below, each with a docstring).

- ``tracking_store``: a fresh sqlite MLflow store in ``tmp_path`` with the ``xai-exp`` experiment
  (copied from ``empty_mlflow_db``, migrated once per session).
- ``make_study_run``: log a fake study run (params, metrics, results.csv, overlays) quickly.
- ``free_port``: a loopback TCP port nothing listens on (for servers, or as a "closed" port).
- ``mlflow_server_factory``: start ``mlflow server`` processes on 127.0.0.1, always stopped.
- ``tiny_study_overrides``: Hydra overrides for a real study that runs in seconds on a CPU.
- ``RUN_PY`` / ``REPO_ROOT``: paths of the Hydra entry point and the checkout.

Subprocesses started here get their own process group and are terminated (then killed) in
finalizers, so no server outlives the test session.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from PIL import Image

from xai_exp.evaluate.results import ImageResult, csv_columns

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN_PY = REPO_ROOT / "run.py"
EXPERIMENT = "xai-exp"
PARENT_TAG = "mlflow.parentRunId"


# --------------------------------------------------------------------------- sqlite store


@dataclass
class TrackingStore:
    """A sqlite MLflow store: its URI, a client and the ``xai-exp`` experiment id."""

    uri: str
    client: MlflowClient
    experiment_id: str
    root: Path


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty MLflow sqlite file; copy it instead of migrating a new one (seconds)."""
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments(max_results=1)
    return path


@pytest.fixture
def tracking_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_mlflow_db: Path
) -> TrackingStore:
    """A fresh ``sqlite:///<tmp_path>/mlflow.db`` store; artifacts and cwd stay in tmp_path."""
    monkeypatch.chdir(tmp_path)  # MLflow's relative defaults (./mlruns) land in tmp_path
    shutil.copyfile(empty_mlflow_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment(
        EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri()
    )
    return TrackingStore(uri, client, experiment_id, tmp_path)


# --------------------------------------------------------------------------- fake runs


def tiny_png(color: tuple[int, int, int], size: int = 8) -> bytes:
    """PNG bytes of a solid `size` x `size` image (distinct colours give distinct bytes)."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def drawn_result(iou: float = 0.25, label: str = "tabby", probability: float = 0.5) -> ImageResult:
    """An 8x8 image's result with every array an overlay draws (a CAM, four superpixels)."""
    rng = np.random.default_rng(0)
    segments = np.repeat(np.arange(4), 16).reshape(8, 8)
    result = ImageResult("cat", "cat", values={"iou": iou})
    result.predicted_label, result.target_label, result.probability = label, label, probability
    result.arrays.update(
        image=rng.integers(0, 255, (8, 8, 3), dtype=np.uint8),
        cam=rng.random((8, 8)),
        segments=segments,
        lime_weights=rng.standard_normal(4),
        cam_mask=segments == 0,
        lime_mask=segments < 2,
    )
    return result


@dataclass
class FakeImage:
    """One image of a fake study run; ``iou=None`` for flagged/error images."""

    name: str
    iou: float | None
    status: str = "ok"
    cam_seconds: float = 0.1
    reference_seconds: float = 0.2
    stem: str | None = None  # artifact stem; defaults to the name
    values: Mapping[str, float] = field(default_factory=dict)  # more results.csv metrics

    @property
    def artifact_stem(self) -> str:
        return self.stem or self.name


@dataclass
class FakeRun:
    """What `make_study_run` logged: ids and the overlay bytes per artifact stem."""

    run_id: str
    overlays: dict[str, bytes] = field(default_factory=dict)


def log_study_run(
    client: MlflowClient,
    experiment_id: str,
    images: Sequence[FakeImage],
    *,
    method: str = "gradcam",
    cam_top_fraction: float = 0.1,
    lime_mode: str = "top_k",
    lime_samples: int = 20,
    run_name: str | None = None,
    params: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
    results_csv: bool = True,
    status: str = "FINISHED",
    workdir: Path,
) -> FakeRun:
    """Log a run shaped like the study's (params, tags, metrics, histories, artifacts)."""
    tags = {"model": "resnet18", "method": method}
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    params = {
        "method.name": method,
        "threshold.cam_top_fraction": str(cam_top_fraction),
        "threshold.lime_mode": lime_mode,
        "lime.num_samples": str(lime_samples),
        "model.arch": "resnet18",
        **(params or {}),
    }
    client.log_batch(
        run_id,
        params=[Param(k, v) for k, v in params.items()],
        tags=[RunTag("choice.method", method)],
    )
    stamp = int(time.time() * 1000)
    metrics = []
    for step, image in enumerate(images):
        if image.iou is not None:
            metrics.append(Metric("per_image/iou", image.iou, stamp, step))
        if image.status != "error":
            metrics.append(Metric("per_image/cam_seconds", image.cam_seconds, stamp, step))
            metrics.append(
                Metric("per_image/reference_seconds", image.reference_seconds, stamp, step)
            )
    ious = [i.iou for i in images if i.iou is not None]
    summary = {
        "n_images": len(images),
        "n_compared": len(ious),
        "n_flagged": sum(i.status == "flagged" for i in images),
        "n_failed": sum(i.status == "error" for i in images),
    }
    if ious:
        summary["mean_iou"] = sum(ious) / len(ious)
    metrics += [Metric(k, float(v), stamp, 0) for k, v in summary.items()]
    client.log_batch(run_id, metrics=metrics)

    out = workdir / run_id
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    fake = FakeRun(run_id)
    for image in images:
        if image.status == "error":
            continue
        digest = hashlib.sha1(f"{run_id}/{image.name}".encode()).digest()
        png = tiny_png((digest[0], digest[1], digest[2]))  # unique per run and image
        fake.overlays[image.artifact_stem] = png
        (out / "overlays" / f"{image.artifact_stem}.png").write_bytes(png)
    if fake.overlays:
        client.log_artifacts(run_id, str(out / "overlays"), "overlays")
    if results_csv:
        with (out / "results.csv").open("w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=csv_columns())
            writer.writeheader()
            for image in images:
                writer.writerow(
                    {
                        "image": image.name,
                        "artifact_stem": image.artifact_stem,
                        "status": image.status,
                        "iou": "" if image.iou is None else image.iou,
                        "cam_seconds": "" if image.status == "error" else image.cam_seconds,
                        "reference_seconds": ""
                        if image.status == "error"
                        else image.reference_seconds,
                        **image.values,
                    }
                )
        client.log_artifact(run_id, str(out / "results.csv"))
    client.set_terminated(run_id, status)
    return fake


@pytest.fixture
def make_study_run(tmp_path: Path) -> Callable[..., FakeRun]:
    """``make_study_run(client, experiment_id, [FakeImage(...)], method=..., ...)`` -> FakeRun."""
    workdir = tmp_path / "fake-run-files"

    def make(client: MlflowClient, experiment_id: str, images: Sequence[FakeImage], **kw):
        return log_study_run(client, experiment_id, images, workdir=workdir, **kw)

    return make


# --------------------------------------------------------------------------- ports and servers


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    """A free loopback port (also usable as a port where no server answers)."""
    return find_free_port()


@dataclass
class MlflowServer:
    """A running ``mlflow server`` subprocess on 127.0.0.1."""

    url: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server's output (for assertion messages)."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL it after 15 s; idempotent."""
        if self.process.poll() is None:
            _signal_group(self.process, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                _signal_group(self.process, signal.SIGKILL)
                self.process.wait(timeout=10)
        # Workers (uvicorn) share the group; make sure none is left behind.
        _signal_group(self.process, signal.SIGKILL)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)  # the server was started as its own group leader


def wait_for_health(server: MlflowServer, timeout: float) -> None:
    """Poll ``/health`` until it answers OK; fail with the server log when it does not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"mlflow server exited early:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"mlflow server not healthy after {timeout:.0f}s:\n{server.log_tail()}")


def start_mlflow_server(
    backend_store_uri: str,
    artifacts_dir: Path,
    log_dir: Path,
    *,
    startup_timeout: float = 90.0,
    extra_env: Mapping[str, str] | None = None,
) -> MlflowServer:
    """Start ``mlflow server`` on a free loopback port with proxied artifacts in `artifacts_dir`.

    One worker, job execution off (no background job runner processes). Returns once
    ``/health`` answers; the caller must ``stop()`` it (the factory fixture does).
    """
    port = find_free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"mlflow-server-{port}.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(extra_env or {})}
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--backend-store-uri", backend_store_uri,
        "--artifacts-destination", str(artifacts_dir),
        "--workers", "1",
    ]  # fmt: skip
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=log_dir,
            env=env,
            start_new_session=True,
        )
    server = MlflowServer(f"http://127.0.0.1:{port}", process, log_path)
    try:
        wait_for_health(server, startup_timeout)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def mlflow_server_factory() -> Iterator[Callable[..., MlflowServer]]:
    """``start(backend_store_uri, artifacts_dir, log_dir) -> MlflowServer``.

    Every server started through it is stopped at the end of the session at the latest;
    fixtures with a narrower scope should call ``server.stop()`` in their own teardown.
    """
    started: list[MlflowServer] = []

    def start(backend_store_uri: str, artifacts_dir: Path, log_dir: Path, **kw) -> MlflowServer:
        server = start_mlflow_server(backend_store_uri, artifacts_dir, log_dir, **kw)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# --------------------------------------------------------------------------- real studies


# A real study in seconds: random ResNet-18 at 64 px, 2 images, few LIME samples.
TINY_STUDY = [
    "model=resnet18",
    "model.weights=null",
    "model.input_size=64",
    "data.limit=2",
    "lime.num_samples=30",
    "progress=false",
]


def restore_default_signals() -> None:
    """Python's own handlers for SIGTERM, SIGHUP and SIGINT (after a test installed ours)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def sigint_as_default() -> None:
    """Popen's preexec_fn: Ctrl-C reaches the child as at a terminal. A shell that starts the
    tests in the background (``.ci/run &``) ignores SIGINT, and children inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_interruptible(args: list[str], cwd: Path, text: bool = False) -> subprocess.Popen:
    """Start a command whose output is piped and which signals reach as at a terminal."""
    return subprocess.Popen(
        args,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=text,
        preexec_fn=sigint_as_default,
    )


def study_command(tmp_path: Path, *overrides: str, multirun: bool = False) -> list[str]:
    """`python run.py [-m]` with its own sqlite store and cache in tmp_path (run it there)."""
    return [
        sys.executable,
        str(RUN_PY),
        *(["-m"] if multirun else []),
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"cache.dir={tmp_path}/cache",
        *overrides,
    ]


@pytest.fixture
def tiny_study_overrides(tmp_path: Path) -> list[str]:
    """TINY_STUDY with the cache in tmp_path (add tracking.uri yourself)."""
    return [*TINY_STUDY, f"cache.dir={tmp_path / 'cache'}"]
