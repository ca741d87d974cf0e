"""Hydra callback that groups a multirun sweep under one MLflow parent run."""

from __future__ import annotations

import atexit
import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from xai_exp.errors import describe
from xai_exp.files import atomic_write_text
from xai_exp.tracking import (
    ROLE_TAG,
    RunLogger,
    TrackingError,
    child_runs,
    connect,
    redact_uri,
)

log = logging.getLogger("xai_exp")

PARENT_FILE = "mlflow_parent.json"  # in the sweep dir: the parent run id and the swept keys


def read_parent_marker(sweep_dir: str | Path | None) -> dict[str, Any] | None:
    """What the sweep callback left for the jobs (``run_id``, ``uri``, ``swept_keys``)."""
    if sweep_dir is None:
        return None
    marker = Path(sweep_dir) / PARENT_FILE
    return json.loads(marker.read_text()) if marker.is_file() else None


def swept_keys(config: DictConfig) -> list[str]:
    """Config keys the sweep varies: sweep overrides on the command line and sweeper params."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    keys = [o.get_key_element() for o in parsed if o.is_sweep_override()]
    params = config.hydra.sweeper.get("params") or {}
    return sorted(set(keys) | set(params))


class MlflowSweepCallback(Callback):
    """Opens a parent run when a sweep starts; closes it (with the comparison) at the end.

    The parent is closed even when a job fails or the sweep is interrupted: Hydra skips
    `on_multirun_end` after a failed job, so an exit hook closes it then.
    """

    def __init__(self) -> None:
        self.parent: RunLogger | None = None
        self.sweep_dir: Path | None = None
        self.cfg: DictConfig | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        tracking = config.get("tracking")
        if tracking is None or not tracking.enabled:
            return
        try:
            client, experiment_id = connect(tracking.uri, tracking.experiment)
        except TrackingError as error:
            log.error("%s", error)
            raise SystemExit(2) from None
        self.sweep_dir = Path(config.hydra.sweep.dir).resolve()
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        overrides = " ".join(config.hydra.overrides.task) or "(none)"
        self.parent = RunLogger.start(
            client,
            experiment_id,
            run_name=f"sweep {self.sweep_dir.name}",
            tags={
                "sweep_dir": str(self.sweep_dir),
                "sweep_overrides": overrides,
                ROLE_TAG: "sweep",
            },
        )
        self.cfg = config
        atomic_write_text(
            self.sweep_dir / PARENT_FILE,
            json.dumps(
                {
                    "run_id": self.parent.run_id,
                    "uri": redact_uri(tracking.uri),
                    "swept_keys": swept_keys(config),
                }
            ),
        )
        atexit.register(self._close, interrupted=True)
        log.info("sweep parent run %s", self.parent.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._close(interrupted=False)

    def _close(self, interrupted: bool) -> None:
        """Log the comparison to the parent and set its status from the children's."""
        parent, self.parent = self.parent, None
        if parent is None:
            return
        children = child_runs(parent.client, parent.client.get_run(parent.run_id))
        failed = [c for c in children if c.info.status == "FAILED"]
        try:
            from xai_exp.compare import log_comparison_to_parent

            log_comparison_to_parent(parent, children, self.sweep_dir)
        except Exception as error:  # noqa: BLE001 - closing the parent matters more
            log.warning("could not log the sweep comparison: %s", describe(error))
        parent.set_tags({"n_children": len(children), "n_failed_children": len(failed)})
        if failed:
            parent.finish("FAILED")
        else:
            parent.finish("KILLED" if interrupted else "FINISHED")
