"""MLflow logging of study runs: params, metrics, artifacts, parent/child runs (client API only)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
BATCH = 100


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names the URI and what to do."""


@contextlib.contextmanager
def temporary_env(values: Mapping[str, str]) -> Iterator[None]:
    """Temporarily set environment variables (MLflow reads its settings at each request)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def fail_fast_http() -> contextlib.AbstractContextManager[None]:
    """No HTTP retries and a short timeout: an unreachable server is reported at once."""
    return temporary_env(
        {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    )


def connect(uri: str, experiment: str) -> tuple[MlflowClient, str]:
    """Client and experiment id; fails fast with one line when the store is unreachable.

    Creating the experiment here, once, before any job starts avoids parallel jobs racing to
    create it in the same store.
    """
    client = MlflowClient(tracking_uri=uri)
    try:
        with fail_fast_http():
            found = client.get_experiment_by_name(experiment)
            if found is not None:
                return client, found.experiment_id
            try:
                return client, client.create_experiment(experiment)
            except Exception:
                found = client.get_experiment_by_name(experiment)
                if found is None:
                    raise
                return client, found.experiment_id
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise TrackingError(
            f"tracking store {uri} is unreachable ({type(error).__name__}: {first[:160]}); "
            "start the server or set tracking.uri=sqlite:///mlflow.db (or tracking.enabled=false)"
        ) from error


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config to dotted keys: {'lime': {'seed': 0}} -> {'lime.seed': 0}."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _now_ms() -> int:
    return int(time.time() * 1000)


class RunLogger:
    """One MLflow run, written through the client (no global active run)."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    @classmethod
    def start(
        cls,
        client: MlflowClient,
        experiment_id: str,
        run_name: str | None,
        tags: Mapping[str, str],
        parent_run_id: str | None = None,
    ) -> RunLogger:
        """Create a run (a child of `parent_run_id` when given)."""
        all_tags = {key: str(value) for key, value in tags.items()}
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        return cls(client, run.info.run_id)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params in batches; values are stringified (None as 'null')."""
        items = [
            Param(key, "null" if value is None else str(value)[:6000])
            for key, value in params.items()
        ]
        for start in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, params=items[start : start + BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Tags in one batch."""
        items = [RunTag(key, str(value)[:5000]) for key, value in tags.items()]
        for start in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, tags=items[start : start + BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Finite metrics in batches (NaN and None are skipped: MLflow charts cannot show them)."""
        stamp = _now_ms()
        items = [
            Metric(key, float(value), stamp, step)
            for key, value in metrics.items()
            if value is not None and math.isfinite(float(value))
        ]
        for start in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, metrics=items[start : start + BATCH])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload one local file."""
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_table(self, data: Any, artifact_file: str) -> None:
        """A table MLflow shows in its artifact viewer."""
        self.client.log_table(self.run_id, data=data, artifact_file=artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        """Terminate the run with FINISHED, FAILED or KILLED."""
        self.client.set_terminated(self.run_id, status=status)

    def status(self) -> str:
        """Current status of the run."""
        return self.client.get_run(self.run_id).info.status


def terminal_status(error: BaseException | None) -> str:
    """MLflow status for how a run ended."""
    if error is None:
        return RunStatus.to_string(RunStatus.FINISHED)
    if isinstance(error, KeyboardInterrupt):
        return RunStatus.to_string(RunStatus.KILLED)
    return RunStatus.to_string(RunStatus.FAILED)
