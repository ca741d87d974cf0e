"""A tracking server that dies mid-run (#23.7b), against a real `mlflow server` on 127.0.0.1.

The study ends within a bounded time with one line naming its local results (exit code 2),
and the run it could not close is closed as FAILED, naming the folder, by the next command
that reaches the server again.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from conftest import RUN_PY
from mlflow.tracking import MlflowClient

from xai_exp.track.runs import HTTP_LIMITS, SERVER_LOST_FILE, server_lost

BOUND_S = 120  # from the server's death to the process's exit (MLflow's defaults: ~16 min)


def _rows(path: Path) -> int:
    """Data rows of a results.csv written so far (0 when it is not there yet)."""
    try:
        with path.open(newline="") as handle:
            return max(0, sum(1 for _ in csv.reader(handle)) - 1)
    except OSError:
        return 0


def test_a_lost_server_ends_the_study_in_bounded_time_and_its_run_is_closed_later(
    mlflow_server_factory, tmp_path, empty_mlflow_db, tiny_study_overrides
):
    root = tmp_path / "server"
    root.mkdir()
    shutil.copyfile(empty_mlflow_db, root / "mlflow.db")
    backend = f"sqlite:///{root / 'mlflow.db'}"
    server = mlflow_server_factory(backend, root / "artifacts", root)
    out_dir = tmp_path / "out"
    images = 6
    command = [
        sys.executable, str(RUN_PY), *tiny_study_overrides,
        f"data.limit={images}", "lime.num_samples=150", "tracking.experiment=lost",
        f"tracking.uri={server.url}", f"hydra.run.dir={out_dir}",
    ]  # fmt: skip
    env = {key: value for key, value in os.environ.items() if key not in HTTP_LIMITS}
    process = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        deadline = time.monotonic() + 240
        while _rows(out_dir / "results.csv") < 1:  # the run exists and the study is under way
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no result row after 240 s"
            time.sleep(0.1)
        server.stop()  # the whole process group: gone mid-run
        died = time.monotonic()
        _, stderr = process.communicate(timeout=BOUND_S + 60)
        took = time.monotonic() - died
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    print(f"from the server's death to the exit: {took:.1f} s")
    assert took < BOUND_S, stderr[-3000:]
    assert process.returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"xai-exp: the tracking server at {server.url} stopped answering")
    assert f"the results are in {out_dir} (results.csv, summary.json, overlays/)" in last
    assert "will be closed as FAILED the next time xai-exp reaches the server" in last
    assert _rows(out_dir / "results.csv") == images  # every image, though the server was gone
    assert (out_dir / "summary.json").is_file()
    marker = json.loads((out_dir / SERVER_LOST_FILE).read_text())
    run_id = marker["run_id"]
    assert f"the run {run_id} " in last

    # the server returns (same store): the next command closes the run, naming the folder
    server = mlflow_server_factory(backend, root / "artifacts", root)
    client = MlflowClient(tracking_uri=server.url)
    assert client.get_run(run_id).info.status == "RUNNING"
    done = subprocess.run(
        [sys.executable, "-m", "xai_exp", "compare", "--tracking-uri", server.url,
         "--experiment", "lost", "--out", str(tmp_path / "comparison")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == f"tracking server lost mid-run; local results in {out_dir}"
    logged = {item.path for item in client.list_artifacts(run_id)}
    assert {"results.csv", "summary.json"} <= logged
    server.stop()


def test_only_a_server_that_stopped_answering_counts_as_lost():
    import requests
    from mlflow.exceptions import MlflowException

    def wrapped(cause: BaseException) -> MlflowException:
        """As MLflow's rest_utils raises it: no ``from``, the cause is the context."""
        error = MlflowException("API request to http://127.0.0.1:1/api failed")
        error.__context__ = cause
        return error

    assert server_lost(wrapped(requests.exceptions.ConnectionError("refused")))
    assert server_lost(wrapped(requests.exceptions.ReadTimeout("slow")))
    assert server_lost(MlflowException("API request failed with error code 503 != 200"))
    assert not server_lost(MlflowException("INVALID_PARAMETER_VALUE: param changed"))
    assert not server_lost(wrapped(requests.exceptions.RetryError("too many 500 error responses")))
    assert not server_lost(ValueError("bad"))
