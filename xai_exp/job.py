"""One study job: validate, create the MLflow run, run the study, write and log its results.

The Hydra adapter (`xai_exp.app`) turns the composed config into a `StudyConfig` and Hydra's
facts into a `JobContext`; everything here works without Hydra.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from xai_exp.cache import ExplanationCache
from xai_exp.config import StudyConfig, validate
from xai_exp.data import ImageItem, SkippedFile, bundled_images, folder_images
from xai_exp.errors import describe
from xai_exp.explainers.cam import check_method
from xai_exp.files import atomic_write_text
from xai_exp.models import Classifier, load_classifier, resolve_device
from xai_exp.outputs import ResultsWriter, explanation_params, write_run_files
from xai_exp.pipeline import Study, library_versions, run_study
from xai_exp.results import METRICS, ImageResult, csv_columns, load_plugins, summary_metrics
from xai_exp.sweep import read_parent_marker
from xai_exp.tracking import RunLogger, connect, flatten, redact_uri, terminal_status

log = logging.getLogger("xai_exp")


@dataclass(frozen=True)
class JobContext:
    """Where the job runs: its output folder and, in a sweep, the sweep's facts."""

    output_dir: Path
    multirun: bool = False
    sweep_dir: str | None = None
    override_dirname: str = ""
    job_num: int | None = None
    task_overrides: tuple[str, ...] = ()
    choices: Mapping[str, str] = field(default_factory=dict)


def load_images(cfg: StudyConfig) -> tuple[list[ImageItem], list[SkippedFile]]:
    """The configured images, or a DataError before any compute."""
    if cfg.data.source == "folder":
        assert cfg.data.dir is not None  # validate() guarantees it
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


# --------------------------------------------------------------------------- naming and tags


def run_name(cfg: StudyConfig, context: JobContext) -> str:
    """tracking.run_name; in a sweep the swept overrides (`method=gradcam,threshold=top5`)."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    if context.multirun:
        marker = read_parent_marker(context.sweep_dir)
        swept = set(marker.get("swept_keys", [])) if marker else set()
        named = [o for o in context.task_overrides if o.split("=", 1)[0].lstrip("+~") in swept]
        if named:
            return ",".join(named)
        if context.override_dirname:
            return context.override_dirname
    return f"{cfg.method.name}-{cfg.model.arch}-top{cfg.threshold.cam_top_fraction:g}"


def run_tags(cfg: StudyConfig, context: JobContext) -> dict[str, str]:
    """Tags known before the model loads: method, precision, versions, commit, sweep facts."""
    versions = library_versions()
    tags = {
        "method": cfg.method.name,
        "precision": cfg.precision,
        **{f"version.{name}": versions[name] for name in ("torch", "grad-cam", "lime", "xai-exp")},
    }
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    if context.multirun:
        tags["sweep_dir"] = str(context.sweep_dir)
        tags["job_num"] = str(context.job_num)
        tags["overrides"] = context.override_dirname or "(none)"
    for group, choice in context.choices.items():
        tags[f"choice.{group}"] = str(choice)
    return tags


def model_tags(classifier: Classifier) -> dict[str, str]:
    """Tags known once the model is loaded."""
    return {
        "model": classifier.arch,
        "model_identity": classifier.identity,
        "device": str(classifier.device),
    }


def logged_config(cfg: StudyConfig) -> StudyConfig:
    """The config as logged: the tracking URI without its password."""
    tracking = dataclasses.replace(cfg.tracking, uri=redact_uri(cfg.tracking.uri))
    return dataclasses.replace(cfg, tracking=tracking)


# --------------------------------------------------------------------------- MLflow run


def start_run(cfg: StudyConfig, context: JobContext, out_dir: Path) -> RunLogger:
    """Create the MLflow run (a child when in a sweep) and log the resolved config."""
    client, experiment_id = connect(cfg.tracking.uri, cfg.tracking.experiment)
    marker = read_parent_marker(context.sweep_dir) if context.multirun else None
    run = RunLogger.start(
        client,
        experiment_id,
        run_name(cfg, context),
        run_tags(cfg, context),
        parent_run_id=marker["run_id"] if marker else None,
    )
    log.info(
        "MLflow run %s in experiment %r at %s",
        run.run_id,
        cfg.tracking.experiment,
        redact_uri(cfg.tracking.uri),
    )
    shown = logged_config(cfg)
    run.log_params(flatten(dataclasses.asdict(shown)))
    run.log_artifact(atomic_write_text(out_dir / "config.yaml", config_yaml(shown)))
    return run


def config_yaml(cfg: StudyConfig) -> str:
    """The resolved config as YAML."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def image_logger(run: RunLogger):
    """`ResultsWriter` hook: the overlay and the image's metrics (step = image index)."""

    def log_image(index: int, result: ImageResult, overlay: Path | None) -> None:
        if overlay is not None:
            run.log_artifact(overlay, "overlays")
        values = {spec.image_metric: result.values.get(name) for name, spec in METRICS.items()}
        run.log_metrics(values, step=index)

    return log_image


def log_results(
    run: RunLogger, method: str, summary: dict[str, float], files: list[Path], results
) -> None:
    """Run metrics, the sanity verdict, the files and the results table."""
    import pandas as pd

    run.log_metrics(summary)
    if "mean_randomisation_rho" in summary:
        verdict = "passed" if summary.get("randomisation_pass_rate", 0) >= 0.5 else "failed"
        run.set_tags({"sanity_check": verdict})
        if verdict == "failed":
            log.warning(
                "%s barely changes when the model is randomised (mean rho %.2f): "
                "its maps may not depend on the model",
                method,
                summary["mean_randomisation_rho"],
            )
    for path in files:
        run.log_artifact(path)
    table = pd.DataFrame([r.row() for r in results], columns=list(csv_columns()))
    run.log_table(table.astype(object).where(table.notna(), None), "results_table.json")


def log_partial(run: RunLogger, writer: ResultsWriter | None, error: BaseException) -> None:
    """Keep what finished before a failure: the results so far and the reason."""
    try:
        run.set_tags({"error": describe(error, 500)})
        if writer is not None:
            run.log_artifact(writer.csv_path)
    except Exception as upload_error:  # noqa: BLE001 - never mask the original failure
        log.warning("could not log partial results: %s", describe(upload_error))


# --------------------------------------------------------------------------- the job


def execute(cfg: StudyConfig, context: JobContext) -> float:
    """Run one study and log it; returns the mean IoU.

    Config values are checked before anything else; once the tracking store answers, the run
    exists, so any later failure (a missing folder, a model that does not load) is recorded in
    it as FAILED with the reason, and the images finished so far are kept.
    """
    validate(cfg)
    load_plugins(cfg.metrics.plugins)
    check_method(cfg.method.name)
    resolve_device(cfg.device)
    out_dir = Path(context.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = start_run(cfg, context, out_dir) if cfg.tracking.enabled else None
    writer: ResultsWriter | None = None
    error: BaseException | None = None
    try:
        items, skipped = load_images(cfg)
        classifier = load_classifier(cfg.model, cfg.device)
        study = Study(cfg, classifier, ExplanationCache(cfg.cache.dir, enabled=cfg.cache.enabled))
        if run is not None:
            run.set_tags(model_tags(classifier))
        hook = image_logger(run) if run is not None else None
        writer = ResultsWriter(out_dir, cfg.method.name, on_image=hook)
        results = run_study(study, items, on_result=writer, progress=cfg.progress)
        summary = {
            **summary_metrics(results),
            "n_skipped_files": len(skipped),
            "explanations_computed": study.computed,
            "explanations_reused": study.reused,
        }
        params = explanation_params(cfg, classifier, study.versions)
        files = write_run_files(writer, params, summary, skipped)
        if run is not None:
            log_results(run, cfg.method.name, summary, files, results)
        log.info(
            "%s vs LIME on %d images: mean IoU %.3f, median %.3f (%d computed, %d reused)",
            cfg.method.name,
            len(results),
            summary["mean_iou"],
            summary["median_iou"],
            study.computed,
            study.reused,
        )
        return summary["mean_iou"]
    except BaseException as caught:
        error = caught
        raise
    finally:
        if run is not None:
            if error is not None:
                log_partial(run, writer, error)
            run.finish(terminal_status(error))
