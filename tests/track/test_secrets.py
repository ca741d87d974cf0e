"""Secrets in tracking URIs (#23.6): masked in everything printed, logged or stored."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RUN_PY, TINY_STUDY
from mlflow.tracking import MlflowClient

from xai_exp.track import masking
from xai_exp.track.runs import redact_uri, scrub

SECRET = "s3cret"


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("http://ana:s3cret@lab:5000", "http://ana:***@lab:5000"),
        ("http://ana:s3cret@127.0.0.1:99999/x", "http://ana:***@127.0.0.1:99999/x"),
        ("sqlite:///a.db?password=s3cret&mode=ro", "sqlite:///a.db?password=***&mode=ro"),
        ("sqlite:///a.db?PWD=s3cret", "sqlite:///a.db?PWD=***"),
        ("https://h/?Access_Token=s3cret#x", "https://h/?Access_Token=***#x"),
        ("https://h/x?api_key=s3cret;passwd=s3cret", "https://h/x?api_key=***;passwd=***"),
        ("https://s3/x?X-Amz-Signature=s3cret&a=1", "https://s3/x?X-Amz-Signature=***&a=1"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("http://h/#/runs?viewStateShareKey=abc", "http://h/#/runs?viewStateShareKey=abc"),
    ],
)
def test_redact_uri_masks_passwords_and_secret_query_values(uri, shown):
    assert redact_uri(uri) == shown


def test_a_remembered_secret_is_masked_wherever_it_appears():
    masking.remember("http://ana:Zq9-secret-value@lab:5000")
    assert (
        masking.mask("quoted: 'Zq9-secret-value' and Zq9%2Dsecret")
        == "quoted: '***' and Zq9%2Dsecret"
    )
    assert scrub("GET http://ana:pw1@lab/api failed", "http://ana:pw1@lab") == (
        "GET http://ana:***@lab/api failed"
    )


def test_log_records_and_streams_are_masked(capsys):
    masking.protect_output()
    logger = logging.getLogger("hydra.test_secrets")
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Keep()
    logger.addHandler(handler)
    try:
        logger.warning("\t#%d : %s", 0, "tracking.uri=http://u:s3cret@h:1 lime.seed=0")
        try:
            raise ValueError("http://u:s3cret@h:1?token=abcd1234 failed")
        except ValueError:
            logger.exception("request failed")
    finally:
        logger.removeHandler(handler)
    sys.stderr.write("Error executing job with overrides: ['tracking.uri=http://u:s3cret@h']\n")
    print("🏃 View run x at: http://u:s3cret@h:1/#/experiments/1/runs/2")
    out = capsys.readouterr()
    text = "\n".join(records) + out.out + out.err
    assert SECRET not in text, text
    assert "abcd1234" not in text, text
    assert "http://u:***@h:1" in text
    assert "View run" in out.out


def _files_with_secret(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]


def _run_texts(client: MlflowClient, run_id: str) -> str:
    run = client.get_run(run_id)
    return f"{run.info.run_name} {run.data.tags} {run.data.params}"


@pytest.mark.slow
def test_a_sweep_with_a_password_in_the_uri_never_shows_it(tmp_path, mlflow_server_factory):
    server = mlflow_server_factory(
        f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "server-artifacts", tmp_path / "logs"
    )
    uri = server.url.replace("http://", f"http://ana:{SECRET}@")
    args = [
        sys.executable, str(RUN_PY), "-m", f"tracking.uri={uri}",
        f"cache.dir={tmp_path}/cache", *TINY_STUDY, "lime.num_samples=30,0",
    ]  # fmt: skip  # the second job fails: its error, Hydra's and failed_jobs
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    output = done.stdout + done.stderr
    assert "Error executing job with overrides" in output, output  # Hydra's line, masked
    assert "#1 : " in output, output  # Hydra's job lines, masked
    assert SECRET not in output, output
    assert "ana:***@" in output
    client = MlflowClient(tracking_uri=server.url)
    runs = client.search_runs(client.get_experiment_by_name("xai-exp").experiment_id)
    assert len(runs) == 2  # the parent and the first job's run
    for run in runs:
        assert SECRET not in _run_texts(client, run.info.run_id)
    parent = next(r for r in runs if r.data.tags.get("role") == "sweep")
    assert "ana:***@" in parent.data.tags["sweep_overrides"]
    assert "lime.num_samples=0" in parent.data.tags["failed_jobs"]
    assert list((tmp_path / "multirun").rglob(".hydra/config.yaml"))
    assert _files_with_secret(tmp_path) == []  # .hydra/*.yaml, multirun.yaml, logs, the store


@pytest.mark.slow
@pytest.mark.parametrize("port", ["99999", "{free_port}"])
def test_a_bad_port_is_one_line_without_the_password(tmp_path, free_port, port):
    uri = f"http://ana:{SECRET}@127.0.0.1:{port.format(free_port=free_port)}"
    for sweep in ([], ["-m"]):
        args = [sys.executable, str(RUN_PY), *sweep, f"tracking.uri={uri}", *TINY_STUDY]
        done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr
        output = done.stdout + done.stderr  # a sweep's line is Hydra's log, on stdout
        assert "Traceback" not in output, output
        lines = [line for line in output.splitlines() if "ana:" in line]
        assert len(lines) == 1, output
        assert "ana:***@" in lines[0]
        assert SECRET not in output
        assert _files_with_secret(tmp_path) == []


def test_compare_never_prints_a_query_secret(free_port, capsys):
    from xai_exp.app.cli import main

    uri = f"http://127.0.0.1:{free_port}/?access_token={SECRET}"
    assert main(["compare", "--tracking-uri", uri]) == 2
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
    assert "access_token=***" in out.err


@pytest.mark.slow
def test_a_query_secret_in_a_sqlite_uri_is_masked_in_a_sweep(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}?password={SECRET}"  # SQLAlchemy ignores it
    args = [sys.executable, str(RUN_PY), "-m", f'tracking.uri="{uri}"']
    args += [f"cache.dir={tmp_path}/cache", *TINY_STUDY, "lime.seed=0,1"]
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert SECRET not in output, output
    assert "password=***" in output
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs(client.get_experiment_by_name("xai-exp").experiment_id)
    assert len(runs) == 3
    for run in runs:
        assert SECRET not in _run_texts(client, run.info.run_id)
    assert _files_with_secret(tmp_path) == []
