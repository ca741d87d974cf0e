"""Hydra callback that groups a multirun sweep under one MLflow parent run."""

from __future__ import annotations

import atexit
import json
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from xai_exp.app.signals import deferred, shielded
from xai_exp.errors import describe
from xai_exp.files import atomic_write_text
from xai_exp.track.masking import mask
from xai_exp.track.runs import (
    OUTPUT_DIR_TAG,
    ROLE_TAG,
    RunLogger,
    TrackingError,
    child_runs,
    connect,
    lost_process_reason,
    process_gone,
    redact_uri,
    run_url,
    server_lost,
    write_lost_marker,
)

log = logging.getLogger("xai_exp")

PARENT_FILE = "mlflow_parent.json"  # in the sweep dir: the parent run id and the swept keys
FAILED_JOBS_FILE = "failed_jobs.jsonl"  # in the sweep dir: jobs that failed before their run


def read_parent_marker(sweep_dir: str | Path | None) -> dict[str, Any] | None:
    """What the sweep callback left for the jobs (``run_id``, ``uri``, ``swept_keys``)."""
    if sweep_dir is None:
        return None
    marker = Path(sweep_dir) / PARENT_FILE
    return json.loads(marker.read_text()) if marker.is_file() else None


def record_failed_job(sweep_dir: str | Path | None, overrides: str, message: str) -> None:
    """Note a job that failed before its run existed (a config error), for the parent."""
    if sweep_dir is None:
        return
    line = json.dumps({"overrides": mask(overrides), "error": mask(message)}) + "\n"
    with (Path(sweep_dir) / FAILED_JOBS_FILE).open("a", encoding="utf-8") as file:
        file.write(line)


def failed_jobs(sweep_dir: str | Path | None) -> list[dict[str, str]]:
    """The jobs `record_failed_job` noted in this sweep."""
    path = Path(sweep_dir) / FAILED_JOBS_FILE if sweep_dir is not None else None
    if path is None or not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def swept_keys(config: DictConfig) -> list[str]:
    """Config keys the sweep varies: sweep overrides on the command line and sweeper params."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    keys = [o.get_key_element() for o in parsed if o.is_sweep_override()]
    params = config.hydra.sweeper.get("params") or {}
    return sorted(set(keys) | set(params))


_OPEN: list[MlflowSweepCallback] = []  # sweeps whose parent run is still open


def close_open_sweeps(interrupted: bool) -> None:
    """Close every sweep parent still open (the application calls this whatever ends a sweep).

    Hydra skips `on_multirun_end` after a failed job or an interrupt; closing here, while the
    interpreter still runs, lets MLflow upload the comparison (an exit hook could not).
    """
    while _OPEN:
        _OPEN.pop()._close(interrupted=interrupted)


def close_lost_children(client: MlflowClient, children: list[Run], interrupted: bool) -> list[Run]:
    """Close the children left RUNNING by a process that is gone (a joblib worker killed by a
    second Ctrl-C, kill -9, out of memory): KILLED in an interrupted sweep, else FAILED.
    Returns the children as they are now."""
    now = []
    for child in children:
        tags = child.data.tags
        if child.info.status == "RUNNING" and process_gone(tags):
            status = "KILLED" if interrupted else "FAILED"
            reason = (
                "Terminated: its worker process was stopped with the sweep"
                if interrupted
                else lost_process_reason(tags)
            )
            client.set_tag(child.info.run_id, "error", reason)
            client.set_terminated(child.info.run_id, status)
            log.warning("run %s (%s) marked %s: %s", child.info.run_id, child.info.run_name,
                        status, reason)  # fmt: skip
            child = client.get_run(child.info.run_id)
        now.append(child)
    return now


def sweep_note(children: int, findings: list[str]) -> str:
    """The sweep parent's description in the MLflow UI (Markdown): the comparison's findings."""
    lines = "\n".join(f"- {line}" for line in findings)
    return (
        f"**Sweep of {children} runs.** Settings compared by agreement above chance, "
        "(IoU - chance) / (ceiling - chance), where their mask sizes differ.\n\n"
        f"{lines}\n\nEvery number, the paired tests and the plots: `comparison/report.html`."
    )


class MlflowSweepCallback(Callback):
    """Opens a parent run when a sweep starts; closes it (with the comparison) at the end.

    The parent is closed even when a job fails or the sweep is interrupted: the application
    calls `close_open_sweeps` then, and an exit hook is the last resort.
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
        overrides = " ".join(config.hydra.overrides.task) or "(none)"  # masked by RunLogger
        with deferred():  # an interrupt here arrives once the parent is known, so it is closed
            self.parent = RunLogger.start(
                client,
                experiment_id,
                run_name=f"sweep {self.sweep_dir.name}",
                tags={
                    "sweep_dir": str(self.sweep_dir),
                    OUTPUT_DIR_TAG: str(self.sweep_dir),
                    "sweep_overrides": overrides,
                    ROLE_TAG: "sweep",
                },
            )
            self.cfg = config
            _OPEN.append(self)
        swept = swept_keys(config)
        axes = {
            key: value
            for key, value in (o.split("=", 1) for o in config.hydra.overrides.task if "=" in o)
            if key.lstrip("+~") in swept
        }
        sweeper = config.hydra.sweeper.get("params") or {}
        axes.update({str(k): str(v) for k, v in sweeper.items()})
        self.parent.log_params({f"swept.{key.lstrip('+~')}": value for key, value in axes.items()})
        atomic_write_text(
            self.sweep_dir / PARENT_FILE,
            json.dumps(
                {
                    "run_id": self.parent.run_id,
                    "uri": redact_uri(tracking.uri),
                    "swept_keys": swept,
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
        with shielded():  # a second interrupt cannot leave the parent RUNNING
            self._finish(parent, interrupted)

    def _finish(self, parent: RunLogger, interrupted: bool) -> None:
        try:
            children = child_runs(parent.client, parent.experiment_id, parent.run_id)
            children = close_lost_children(parent.client, children, interrupted)
        except Exception as error:
            if not server_lost(error):
                raise
            parent.lost = error
            self._lost(parent)
            return
        winner = ""
        failed = [c for c in children if c.info.status == "FAILED"]
        try:
            from xai_exp.compare.comparison import log_comparison_to_parent

            uri = self.cfg.tracking.uri if self.cfg is not None else ""
            comparison = log_comparison_to_parent(parent, children, self.sweep_dir, uri)
            findings = comparison.findings()
            table = comparison.table
            means = table["mean_iou"].dropna()
            if len(means):
                parent.log_metrics(
                    {
                        "best_mean_iou": float(means.max()),
                        "worst_mean_iou": float(means.min()),
                        "n_settings": len(table),
                    }
                )
            found = comparison.verdict
            if found is not None:
                winner = f"{found.best.label}: {found.measure} {found.best.value_text()}"
                parent.log_metrics(
                    {f"best_mean_{found.metric}": found.best.mean,
                     f"worst_mean_{found.metric}": found.worst.mean}
                )  # fmt: skip
                parent.set_tags(
                    {
                        "best_setting": found.best.label,
                        "worst_setting": found.worst.label,
                        "mlflow.note.content": sweep_note(len(children), findings),
                    }
                )
        except Exception as error:  # noqa: BLE001 - closing the parent matters more
            log.warning("could not log the sweep comparison: %s", describe(error))
        refused = failed_jobs(self.sweep_dir)
        counts = {"n_children": len(children), "n_failed_children": len(failed)}
        parent.log_metrics(counts)
        tags: dict[str, Any] = dict(counts)
        if refused:
            tags["failed_jobs"] = "; ".join(f"{j['overrides']}: {j['error']}" for j in refused)
        parent.set_tags(tags)
        # a KILLED child that a requeued job resumed (tag resumed_by) is not a stopped job
        stopped = [c for c in children
                   if c.info.status == "KILLED" and "resumed_by" not in c.data.tags]  # fmt: skip
        # an interrupt ends the sweep KILLED whatever its jobs did (a job the signal caught
        # mid-start fails as it goes); otherwise a failed job fails it, a stopped one kills it
        if interrupted:
            status = "KILLED"
        else:
            status = "FAILED" if failed or refused else "KILLED" if stopped else "FINISHED"
        parent.finish(status)
        if parent.lost is not None:
            self._lost(parent)
            return
        print(self.end_block(parent, status, len(children), winner), flush=True)

    def _lost(self, parent: RunLogger) -> None:
        """The tracking server stopped answering: record the parent for the next command that
        reaches it (`tracking.mark_lost_runs`) and say where the sweep's results are."""
        uri = str(self.cfg.tracking.uri) if self.cfg is not None else ""
        if self.sweep_dir is not None:
            write_lost_marker(self.sweep_dir, parent, uri)
        print(
            f"xai-exp: the tracking server at {redact_uri(uri)} stopped answering; the sweep's "
            f"results are in {self.sweep_dir}; its parent run {parent.run_id} will be closed as "
            "FAILED the next time xai-exp reaches the server",
            file=sys.stderr,
            flush=True,
        )

    def end_block(self, parent: RunLogger, status: str, n_children: int, winner: str = "") -> str:
        """The lines printed when the sweep ends: its runs, report, parent's URL and folder."""
        lines = [
            f"xai-exp: sweep {status.lower()}: {n_children} runs under parent run {parent.run_id}"
        ]
        report = self.sweep_dir / "comparison" / "report.html" if self.sweep_dir else None
        if winner:
            lines.append(f"  best setting   {winner}")
        if report is not None and report.is_file():
            lines.append(f"  report         {report}")
        if self.cfg is not None:
            url = run_url(self.cfg.tracking.uri, parent.experiment_id, parent.run_id)
            lines.append(f"  parent run     {url}")
        if self.sweep_dir:
            lines.append(f"  sweep folder   {self.sweep_dir}")
        return "\n".join(lines)
