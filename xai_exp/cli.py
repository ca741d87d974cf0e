"""The Hydra job: compose config -> run the study -> log everything to MLflow."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from xai_exp import plots
from xai_exp.cache import ExplanationCache
from xai_exp.config import ConfigError, StudyConfig, validate
from xai_exp.data import DataError, ImageItem, SkippedFile, bundled_images, folder_images
from xai_exp.explainers.cam import check_method
from xai_exp.faithfulness import curve_plot
from xai_exp.metrics import summarize
from xai_exp.models import Classifier, ModelLoadError, load_classifier, resolve_device
from xai_exp.pipeline import ImageResult, Study, library_versions, run_study
from xai_exp.tracking import RunLogger, TrackingError, connect, flatten, terminal_status

log = logging.getLogger("xai_exp")

USER_ERRORS = (ConfigError, DataError, ModelLoadError, TrackingError)
PARENT_FILE = "mlflow_parent.json"


class JobError(CompactHydraException):
    """A user-facing failure: Hydra prints its message alone, without a traceback."""


def register_configs() -> None:
    """Register the typed schema that every composed config is validated against."""
    ConfigStore.instance().store(name="study_schema", node=StudyConfig)


def to_study_config(cfg: DictConfig) -> StudyConfig:
    """The typed config of the job (Hydra's own node removed)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    merged = OmegaConf.merge(OmegaConf.structured(StudyConfig), plain)
    return OmegaConf.to_object(merged)


def load_images(cfg: StudyConfig) -> tuple[list[ImageItem], list[SkippedFile]]:
    """The configured images, or a DataError before any compute."""
    if cfg.data.source == "folder":
        items, skipped = folder_images(cfg.data.dir, limit=cfg.data.limit)
        for file in skipped:
            log.warning("skipped %s: %s", file.path, file.reason)
        return items, skipped
    return bundled_images(limit=cfg.data.limit), []


def git_commit() -> str | None:
    """Commit of the xai-exp checkout, when it is one."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _atomic_write_text(path: Path, text: str) -> Path:
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(temp_name, path)
    return path


def explanation_params(cfg: StudyConfig, classifier: Classifier) -> dict[str, Any]:
    """What determines the explanations, as JSON (never pickled)."""
    return {
        "model": {
            "arch": classifier.arch,
            "identity": classifier.identity,
            "target_layer": classifier.target_layer_name,
            "input_size": classifier.input_size,
        },
        "method": OmegaConf.to_container(OmegaConf.structured(cfg.method)),
        "lime": OmegaConf.to_container(OmegaConf.structured(cfg.lime)),
        "threshold": OmegaConf.to_container(OmegaConf.structured(cfg.threshold)),
        "precision": cfg.precision,
        "device": str(classifier.device),
        "versions": library_versions(),
    }


class ResultsWriter:
    """Writes each image's row, overlay and metrics as soon as it is done."""

    def __init__(self, out_dir: Path, cfg: StudyConfig, run: RunLogger | None) -> None:
        self.out_dir = out_dir
        self.cfg = cfg
        self.run = run
        self.csv_path = out_dir / "results.csv"
        self.results: list[ImageResult] = []
        self.curves: dict[str, list] = {}  # faithfulness curves per map source, for the plot
        with self.csv_path.open("w", newline="", encoding="utf-8") as file:
            csv.DictWriter(file, fieldnames=ImageResult.CSV_COLUMNS).writeheader()

    def __call__(self, index: int, result: ImageResult) -> None:
        self.results.append(result)
        with self.csv_path.open("a", newline="", encoding="utf-8") as file:
            csv.DictWriter(file, fieldnames=ImageResult.CSV_COLUMNS).writerow(result.row())
        if result.status != "error":
            overlay = self.out_dir / "overlays" / f"{result.artifact_stem}.png"
            plots.save_figure(plots.overlay_figure(result, self.cfg.method.name), overlay)
            if self.run:
                self.run.log_artifact(overlay, "overlays")
        for source, curves in result.arrays.get("faithfulness", {}).items():
            self.curves.setdefault(source, []).append(curves)
        if self.run:
            per_image = {
                f"image_{name}": getattr(result, name) for name in ImageResult.METRIC_COLUMNS
            }
            for name in ("cam_seconds", "lime_seconds", "segmentation_seconds"):
                per_image[f"image_{name}"] = getattr(result, name)
            self.run.log_metrics(per_image, step=index)
        result.arrays.clear()  # keep memory flat over long folders


def summary_metrics(results: list[ImageResult], study: Study, skipped: int) -> dict[str, float]:
    """Run-level metrics for the MLflow runs table and charts."""
    iou = summarize(r.iou for r in results)
    metrics = {
        "mean_iou": iou["mean"],
        "median_iou": iou["median"],
        "std_iou": iou["std"],
        "n_images": len(results),
        "n_compared": iou["count"],
        "n_flagged": sum(r.status == "flagged" for r in results),
        "n_failed": sum(r.status == "error" for r in results),
        "n_skipped_files": skipped,
        "explanations_computed": study.computed,
        "explanations_reused": study.reused,
    }
    for name in ("cam_seconds", "lime_seconds", "segmentation_seconds"):
        metrics[f"mean_{name}"] = summarize(getattr(r, name) for r in results)["mean"]
    for name in ImageResult.METRIC_COLUMNS[1:]:
        values = [getattr(r, name) for r in results]
        if any(v is not None for v in values):
            metrics[f"mean_{name}"] = summarize(values)["mean"]
    passed = [r.randomisation_passed for r in results if r.randomisation_passed is not None]
    if passed:
        metrics["randomisation_pass_rate"] = sum(passed) / len(passed)
    return metrics


def _job_context() -> dict[str, Any]:
    """Hydra facts about this job: output dir, run mode, sweep dir, overrides, choices."""
    if not HydraConfig.initialized():
        return {"output_dir": Path.cwd(), "multirun": False}
    hydra = HydraConfig.get()
    multirun = hydra.mode == RunMode.MULTIRUN
    return {
        "output_dir": Path(hydra.runtime.output_dir),
        "multirun": multirun,
        "sweep_dir": str(Path(hydra.sweep.dir).resolve()) if multirun else None,
        "override_dirname": hydra.job.override_dirname,
        "job_num": hydra.job.get("num"),
        "task_overrides": list(hydra.overrides.task),
        "choices": {k: v for k, v in hydra.runtime.choices.items() if not k.startswith("hydra/")},
    }


def _parent_marker(context: dict[str, Any]) -> dict[str, Any] | None:
    """What the sweep callback left for the jobs: parent run id and swept keys."""
    if not context["multirun"]:
        return None
    marker = Path(context["sweep_dir"]) / PARENT_FILE
    return json.loads(marker.read_text()) if marker.is_file() else None


def _parent_run_id(context: dict[str, Any]) -> str | None:
    marker = _parent_marker(context)
    return marker["run_id"] if marker else None


def _run_tags(cfg: StudyConfig, context: dict[str, Any]) -> dict[str, str]:
    versions = library_versions()
    tags = {
        "method": cfg.method.name,
        "precision": cfg.precision,
        "version.torch": versions["torch"],
        "version.grad-cam": versions["grad-cam"],
        "version.lime": versions["lime"],
        "version.xai-exp": versions["xai-exp"],
    }
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    if context["multirun"]:
        tags["sweep_dir"] = context["sweep_dir"]
        tags["job_num"] = str(context["job_num"])
        tags["overrides"] = context["override_dirname"] or "(none)"
    for group, choice in context.get("choices", {}).items():
        tags[f"choice.{group}"] = str(choice)
    return tags


def _model_tags(cfg: StudyConfig, classifier: Classifier) -> dict[str, str]:
    return {
        "model": classifier.arch,
        "model_identity": classifier.identity,
        "device": str(classifier.device),
    }


def _run_name(cfg: StudyConfig, context: dict[str, Any]) -> str:
    """tracking.run_name; in a sweep the swept overrides (`method=gradcam,threshold=top5`)."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    if context["multirun"]:
        marker = _parent_marker(context)
        swept = set(marker.get("swept_keys", [])) if marker else set()
        named = [o for o in context["task_overrides"] if o.split("=", 1)[0].lstrip("+~") in swept]
        if named:
            return ",".join(named)
        if context["override_dirname"]:
            return context["override_dirname"]
    return f"{cfg.method.name}-{cfg.model.arch}-top{cfg.threshold.cam_top_fraction:g}"


def execute(cfg: StudyConfig, context: dict[str, Any]) -> float:
    """Run one study and log it; returns the mean IoU.

    Config values are checked before anything else; once the tracking store answers, the run
    exists, so any later failure (a missing folder, a model that does not load) is recorded in
    it as FAILED with the reason, and the images finished so far are kept.
    """
    validate(cfg)
    check_method(cfg.method.name)
    resolve_device(cfg.device)
    out_dir = Path(context["output_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    run = _start_run(cfg, context, out_dir) if cfg.tracking.enabled else None
    writer: ResultsWriter | None = None
    error: BaseException | None = None
    try:
        items, skipped = load_images(cfg)
        classifier = load_classifier(cfg.model, cfg.device)
        study = Study(cfg, classifier, ExplanationCache(cfg.cache.dir, enabled=cfg.cache.enabled))
        if run is not None:
            run.set_tags(_model_tags(cfg, classifier))
        writer = ResultsWriter(out_dir, cfg, run)
        results = run_study(study, items, on_result=writer, progress=cfg.progress)
        metrics = summary_metrics(results, study, len(skipped))
        _write_outputs(out_dir, cfg, classifier, writer, skipped, metrics, run)
        log.info(
            "%s vs LIME on %d images: mean IoU %.3f, median %.3f (%d computed, %d reused)",
            cfg.method.name,
            len(results),
            metrics["mean_iou"],
            metrics["median_iou"],
            study.computed,
            study.reused,
        )
        return metrics["mean_iou"]
    except BaseException as caught:
        error = caught
        raise
    finally:
        if run is not None:
            if error is not None:
                _log_partial(run, writer, error)
            run.finish(terminal_status(error))


def _start_run(cfg: StudyConfig, context: dict[str, Any], out_dir: Path) -> RunLogger:
    """Create the MLflow run (a child when in a sweep) and log the resolved config."""
    client, experiment_id = connect(cfg.tracking.uri, cfg.tracking.experiment)
    run = RunLogger.start(
        client,
        experiment_id,
        _run_name(cfg, context),
        _run_tags(cfg, context),
        parent_run_id=_parent_run_id(context),
    )
    log.info(
        "MLflow run %s in experiment %r at %s",
        run.run_id,
        cfg.tracking.experiment,
        cfg.tracking.uri,
    )
    run.log_params(flatten(OmegaConf.to_container(OmegaConf.structured(cfg))))
    run.log_artifact(_atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg)))
    return run


def _log_partial(run: RunLogger, writer: ResultsWriter | None, error: BaseException) -> None:
    """Keep what finished before a failure: the results so far and the reason."""
    try:
        run.set_tags({"error": f"{type(error).__name__}: {error}".splitlines()[0][:500]})
        if writer is not None:
            run.log_artifact(writer.csv_path)
    except Exception as upload_error:  # noqa: BLE001 - never mask the original failure
        log.warning("could not log partial results: %s", upload_error)


def _write_outputs(
    out_dir: Path,
    cfg: StudyConfig,
    classifier: Classifier,
    writer: ResultsWriter,
    skipped: list[SkippedFile],
    metrics: dict[str, float],
    run: RunLogger | None,
) -> None:
    results = writer.results
    figures = []
    if writer.curves:
        labels = {"cam": cfg.method.name, "lime": "LIME"}
        curves = {labels[source]: found for source, found in writer.curves.items()}
        figures.append(plots.save_figure(curve_plot(curves), out_dir / "faithfulness_curves.png"))
    chart = plots.save_figure(
        plots.iou_bar_chart(results, cfg.method.name), out_dir / "iou_bar_chart.png"
    )
    params_path = _atomic_write_text(
        out_dir / "explanation_params.json",
        json.dumps(explanation_params(cfg, classifier), indent=2),
    )
    summary_path = _atomic_write_text(
        out_dir / "summary.json",
        json.dumps(
            {
                k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in metrics.items()
            },
            indent=2,
        ),
    )
    skipped_path = None
    if skipped:
        skipped_path = out_dir / "skipped_files.csv"
        with skipped_path.open("w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(["path", "reason"])
            writer.writerows([(s.path, s.reason) for s in skipped])
    if run is None:
        return
    run.log_metrics(metrics)
    if "mean_randomisation_rho" in metrics:
        verdict = "passed" if metrics.get("randomisation_pass_rate", 0) >= 0.5 else "failed"
        run.set_tags({"sanity_check": verdict})
        if verdict == "failed":
            log.warning(
                "%s barely changes when the model is randomised (mean rho %.2f): "
                "its maps may not depend on the model",
                cfg.method.name,
                metrics["mean_randomisation_rho"],
            )
    for path in (out_dir / "results.csv", chart, params_path, summary_path, skipped_path, *figures):
        if path is not None:
            run.log_artifact(path)
    import pandas as pd

    table = pd.DataFrame([r.row() for r in results], columns=list(ImageResult.CSV_COLUMNS))
    run.log_table(table.replace({np.nan: None}), "results_table.json")


def run_job(cfg: DictConfig) -> float:
    """Hydra task: one clear line for user errors, a FAILED run for anything else."""
    context = _job_context()
    try:
        return execute(to_study_config(cfg), context)
    except USER_ERRORS as error:
        message = f"xai-exp: {error}"
        if context["multirun"]:
            raise JobError(message) from None
        print(message, file=sys.stderr)
        sys.exit(2)
