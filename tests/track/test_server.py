"""Tests against a real `mlflow server` on 127.0.0.1: browsing, `xai-exp compare`, team mode.

Team mode (PostgreSQL backend + a parallel joblib sweep) needs XAI_EXP_TEST_POSTGRES_URI,
e.g. postgresql://postgres@127.0.0.1:54329/postgres (CI starts one, see .ci/run); a fresh
database is created for the test and dropped afterwards. Without the variable the test is
skipped, unless XAI_EXP_REQUIRE_POSTGRES=1, which makes it fail instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
import uuid

import pytest
from conftest import EXPERIMENT, PARENT_TAG, RUN_PY, FakeImage, tiny_png
from mlflow.tracking import MlflowClient

POSTGRES_ENV = "XAI_EXP_TEST_POSTGRES_URI"
REQUIRE_POSTGRES_ENV = "XAI_EXP_REQUIRE_POSTGRES"
HTTP_TIMEOUT = 30


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
        return response.status, response.read()


def _post_json(url: str, payload: dict) -> dict:
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
        assert response.status == 200
        return json.loads(response.read())


@pytest.fixture(scope="module")
def sqlite_server(mlflow_server_factory, tmp_path_factory, empty_mlflow_db):
    """One `mlflow server` per module: sqlite backend, proxied artifacts, both in tmp."""
    root = tmp_path_factory.mktemp("mlflow-server")
    shutil.copyfile(empty_mlflow_db, root / "mlflow.db")  # skips the schema migrations
    server = mlflow_server_factory(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", root)
    yield server
    server.stop()


def _experiment(client: MlflowClient) -> tuple[str, str]:
    name = f"xai-exp-{uuid.uuid4().hex[:8]}"
    return name, client.create_experiment(name)


# --------------------------------------------------------------------------- browsing


def test_logged_overlay_is_served_as_the_ui_shows_it(sqlite_server, tmp_path):
    url = sqlite_server.url
    client = MlflowClient(tracking_uri=url)
    _, experiment_id = _experiment(client)
    run = client.create_run(experiment_id, run_name="browse", tags={"method": "gradcam"})
    run_id = run.info.run_id
    client.log_param(run_id, "method.name", "gradcam")
    client.log_metric(run_id, "mean_iou", 0.25)
    png = tiny_png((10, 200, 30), size=16)
    (tmp_path / "overlays").mkdir()
    (tmp_path / "overlays" / "x.png").write_bytes(png)
    client.log_artifact(run_id, str(tmp_path / "overlays" / "x.png"), "overlays")
    client.set_terminated(run_id)

    # the runs table of the UI
    found = _post_json(f"{url}/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id]})
    assert [r["info"]["run_id"] for r in found["runs"]] == [run_id]
    listed = found["runs"][0]
    assert listed["info"]["status"] == "FINISHED"
    assert {"key": "mean_iou", "value": 0.25} in [
        {"key": m["key"], "value": m["value"]} for m in listed["data"]["metrics"]
    ]
    assert {"key": "method.name", "value": "gradcam"} in listed["data"]["params"]

    # the artifact browser: listing, then the image the UI loads
    query = urllib.parse.urlencode({"run_id": run_id, "path": "overlays"})
    status, body = _get(f"{url}/api/2.0/mlflow/artifacts/list?{query}")
    assert status == 200
    assert [f["path"] for f in json.loads(body)["files"]] == ["overlays/x.png"]

    query = urllib.parse.urlencode({"path": "overlays/x.png", "run_uuid": run_id})
    status, body = _get(f"{url}/get-artifact?{query}")
    assert (status, body) == (200, png)

    # the same bytes through the artifacts proxy (mlflow-artifacts:/<exp>/<run>/artifacts)
    artifact_uri = client.get_run(run_id).info.artifact_uri
    assert artifact_uri.startswith("mlflow-artifacts:")
    proxied = urllib.parse.urlsplit(artifact_uri).path.lstrip("/")
    status, body = _get(f"{url}/api/2.0/mlflow-artifacts/artifacts/{proxied}/overlays/x.png")
    assert (status, body) == (200, png)

    status, body = _get(f"{url}/")  # the UI itself is served
    assert status == 200
    assert b"<html" in body.lower()


# --------------------------------------------------------------------------- compare over HTTP


def test_compare_command_reads_a_tracking_server(sqlite_server, tmp_path, make_study_run):
    client = MlflowClient(tracking_uri=sqlite_server.url)
    name, experiment_id = _experiment(client)
    parent = client.create_run(experiment_id, run_name="sweep", tags={"role": "sweep"})
    parent_id = parent.info.run_id
    for fraction, ious in [(0.1, [0.2, 0.4]), (0.2, [0.6, 0.8])]:
        make_study_run(
            client, experiment_id, [FakeImage(f"i{n}", v) for n, v in enumerate(ious)],
            cam_top_fraction=fraction, parent_run_id=parent_id,
        )  # fmt: skip

    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "xai_exp", "compare", "--tracking-uri", sqlite_server.url,
         "--experiment", name, "--parent", parent_id, "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mean_iou" in result.stdout
    assert "0.300" in result.stdout
    assert "0.700" in result.stdout
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 1 + 4  # plot + best 3 + worst 1
    assert "overlay not available" not in page
    logged = {f.path for f in client.list_artifacts(parent_id, "comparison")}
    assert logged == {
        "comparison/comparison.csv",
        "comparison/iou_per_image.csv",
        "comparison/paired.csv",
        "comparison/method_agreement.csv",
        "comparison/iou_vs_threshold.png",
        "comparison/report.html",
    }


# --------------------------------------------------------------------------- team mode


def _driver_scheme(scheme: str) -> str:
    """SQLAlchemy scheme with an installed driver: 2.1 maps bare postgresql:// to psycopg 3,
    while the test extra installs psycopg2, so name psycopg2 unless psycopg 3 is present."""
    if scheme not in ("postgresql", "postgres"):
        return scheme  # the URI already names a driver
    return "postgresql" if importlib.util.find_spec("psycopg") else "postgresql+psycopg2"


@pytest.fixture
def postgres_backend_uri() -> str:
    """A fresh, empty PostgreSQL database for one test (dropped afterwards)."""
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        message = f"PostgreSQL not available: set {POSTGRES_ENV} (CI starts one)"
        if os.environ.get(REQUIRE_POSTGRES_ENV) == "1":
            pytest.fail(f"{message}; {REQUIRE_POSTGRES_ENV}=1 requires it")
        pytest.skip(message)
    import psycopg2
    from psycopg2 import sql

    name = f"xai_exp_test_{uuid.uuid4().hex[:12]}"

    def execute(statement: sql.Composable) -> None:
        connection = psycopg2.connect(base, connect_timeout=10)
        try:
            connection.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
            with connection.cursor() as cursor:
                cursor.execute(statement)
        finally:
            connection.close()

    execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    parts = urllib.parse.urlsplit(base)
    database = parts._replace(scheme=_driver_scheme(parts.scheme), path=f"/{name}")
    yield urllib.parse.urlunsplit(database)
    execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.mark.slow
def test_team_mode_parallel_sweep_on_postgres(
    postgres_backend_uri, mlflow_server_factory, tmp_path, tiny_study_overrides
):
    server = mlflow_server_factory(postgres_backend_uri, tmp_path / "artifacts", tmp_path / "srv")
    try:
        sweep_dir = tmp_path / "multirun"
        command = [
            sys.executable, str(RUN_PY), "-m",
            "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
            "method=gradcam,hirescam", *tiny_study_overrides,
            f"tracking.uri={server.url}", f"hydra.sweep.dir={sweep_dir}",
        ]  # fmt: skip
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-4000:]
        assert "could not log the sweep comparison" not in result.stderr

        client = MlflowClient(tracking_uri=server.url)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        assert experiment is not None
        runs = client.search_runs([experiment.experiment_id])
        parents = [r for r in runs if r.data.tags.get("role") == "sweep"]
        assert len(parents) == 1, [r.data.tags for r in runs]
        parent = parents[0]
        assert parent.info.status == "FINISHED"
        children = [r for r in runs if r.data.tags.get(PARENT_TAG) == parent.info.run_id]
        assert len(runs) == 3
        assert len(children) == 2
        assert {c.data.params["method.name"] for c in children} == {"gradcam", "hirescam"}
        for child in children:
            assert child.info.status == "FINISHED"
            assert "mean_iou" in child.data.metrics
            assert child.data.metrics["n_images"] == 2
            root = {f.path for f in client.list_artifacts(child.info.run_id)}
            assert {"results.csv", "overlays", "summary.json"} <= root
            overlays = client.list_artifacts(child.info.run_id, "overlays")
            assert len(overlays) == 2
            history = client.get_metric_history(child.info.run_id, "per_image/iou")
            assert sorted(m.step for m in history) == [0, 1]
        logged = {f.path for f in client.list_artifacts(parent.info.run_id, "comparison")}
        assert "comparison/report.html" in logged
    finally:
        server.stop()
