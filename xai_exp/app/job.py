"""One study job: validate, create the MLflow run, run the study, write and log its results.

The Hydra adapter (`xai_exp.app.hydra_app`) turns the composed config into a `StudyConfig`
and Hydra's facts into a `JobContext`; everything here works without Hydra.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow.tracking import MlflowClient

from xai_exp.app import signals
from xai_exp.app.signals import deferred
from xai_exp.app.sweep import read_parent_marker
from xai_exp.cache import CACHE_DIR_TAG, ExplanationCache
from xai_exp.config import (
    ConfigError,
    StudyConfig,
    honour_data_dir,
    ignored_overrides,
    lime_seeds,
    overlay_cap,
    random_weights,
    validate,
)
from xai_exp.data.annotations import Annotations
from xai_exp.data.images import (
    ImageSet,
    SkippedFile,
    data_source,
    no_valid_images,
    open_images,
)
from xai_exp.data.labels import ClassIndex
from xai_exp.errors import describe
from xai_exp.evaluate.results import (
    METRICS,
    ImageResult,
    csv_columns,
    summary_metrics,
)
from xai_exp.evaluate.statistics import MIN_INTERVAL_IMAGES, interval_warning
from xai_exp.explain.cam import check_method
from xai_exp.explain.registry import explainer, load_plugins
from xai_exp.explain.superpixels import check_segmentation
from xai_exp.files import atomic_write_text
from xai_exp.models.facts import (
    FACTS_KIND,
    DeferredClassifier,
    ModelFacts,
    cached_facts,
    facts_key,
    store_facts,
)
from xai_exp.models.threads import configure_threads, inference_threads
from xai_exp.outputs.writer import (
    OVERLAYS,
    OverlayPlan,
    ResultsWriter,
    explanation_params,
    write_run_files,
)
from xai_exp.study.pipeline import Study, run_study
from xai_exp.study.steps import library_versions, prepare_for_classifier
from xai_exp.track.runs import (
    OUTPUT_DIR_TAG,
    RunLogger,
    TrackingError,
    connect,
    flatten,
    is_server,
    mark_lost_runs,
    redact_uri,
    run_url,
    runs_table_url,
    server_lost,
    share_table_view,
    terminal_status,
    unreachable,
    write_lost_marker,
)

if TYPE_CHECKING:
    from xai_exp.models.classifier import Classifier

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
    started: float | None = None  # time.perf_counter() at the job's start (startup.py)


class SkipReporter:
    """Logs skipped files: the first `shown` one line each, then one line for the rest."""

    def __init__(self, shown: int = 10) -> None:
        self.shown = shown
        self.count = 0

    def __call__(self, file: SkippedFile) -> None:
        self.count += 1
        if self.count <= self.shown:
            log.warning("skipped %s: %s", file.path, file.reason)

    def close(self) -> None:
        """The line for the files not shown."""
        if self.count > self.shown:
            log.warning(
                "skipped %d more files; every skipped file is in skipped_files.csv",
                self.count - self.shown,
            )


def report_labels(images: ImageSet, classes: ClassIndex, arch: str, shown: int = 10) -> None:
    """One warning per label the model's classes do not have, and one for manifest conflicts."""
    unknown = [
        (label, names) for label, names in images.labels().items() if classes.lookup(label) is None
    ]
    for label, names in unknown[:shown]:
        log.warning(
            "label %r (%d image%s, e.g. %s) is unknown to %s (%s); explained without a true class",
            label,
            len(names),
            "" if len(names) == 1 else "s",
            names[0],
            arch,
            classes.why_unknown(label),
        )
    if len(unknown) > shown:
        log.warning("%d more labels are unknown to %s", len(unknown) - shown, arch)
    if images.label_conflicts:
        log.warning(
            "%d manifest label(s) differ from the class folder's (e.g. %s); the folder's is used",
            len(images.label_conflicts),
            images.label_conflicts[0],
        )


def git_commit() -> str | None:
    """Commit of the xai-exp checkout, when it is one."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


# --------------------------------------------------------------------------- naming and tags


RANDOM_INIT = "random-init"  # marks a model with random weights in names and titles
RANDOM_NOTE = (
    "the model has random weights: its predictions and maps say nothing about a trained classifier"
)


def data_name(cfg: StudyConfig) -> str:
    """The data in a word: the folder's name or ``bundled``, and the shard when sharded."""
    data = cfg.data
    name = data_source(data).name(data)
    return f"{name}-shard{data.shard}of{data.num_shards}" if data.num_shards > 1 else name


def model_name(cfg: StudyConfig) -> str:
    """The architecture, with ``-random-init`` when its weights are random."""
    suffix = f"-{RANDOM_INIT}" if random_weights(cfg.model) else ""
    return f"{cfg.model.arch}{suffix}"


def describe_setting(cfg: StudyConfig) -> str:
    """Data, model and setting, what tells runs apart first, before MLflow cuts the name.

    ``bundled/efficientnet_lite0/gradcam-top10%-lime1000``; a random-init model is marked
    (``resnet18-random-init``) and a non-default LIME mode, segmentation, seed, target class
    or precision is added to the setting.
    """
    lime, default = cfg.lime, StudyConfig().lime
    is_lime = cfg.reference.name == "lime"
    parts = [
        cfg.method.name,
        f"top{cfg.threshold.cam_top_fraction * 100:g}%",
        f"lime{lime.num_samples}" if is_lime else cfg.reference.name,
    ]
    if cfg.threshold.lime_mode != "top_k":
        parts.append(cfg.threshold.lime_mode)
    if lime.segmentation.algorithm != default.segmentation.algorithm:
        parts.append(lime.segmentation.algorithm)
    seeds = lime_seeds(lime) if is_lime else [cfg.reference.seed]
    if len(seeds) > 1:
        parts.append("seeds" + "-".join(str(seed) for seed in seeds))
    elif seeds[0] != default.seed:
        parts.append(f"seed{seeds[0]}")
    if cfg.method.target_class is not None:
        parts.append(f"class{str(cfg.method.target_class).lower()}")
    if cfg.precision != "fp32":
        parts.append(cfg.precision)
    return f"{data_name(cfg)}/{model_name(cfg)}/{'-'.join(parts)}"


def reference_label(cfg: StudyConfig) -> str:
    """What the CAM is compared with, as titles say it: ``LIME-1000``, ``rise``, ``scorecam``."""
    if cfg.reference.name == "lime":
        return f"LIME-{cfg.lime.num_samples}"
    return cfg.reference.name


def _leading(override: str) -> int:
    """Sort key: data and model overrides first (they tell a sweep's runs apart most)."""
    key = override.split("=", 1)[0].lstrip("+~")
    return 0 if key.split(".")[0] in ("data", "model") else 1


def run_name(cfg: StudyConfig, context: JobContext) -> str:
    """tracking.run_name; in a sweep the swept overrides, data and model ones first
    (`model.arch=resnet18,method=gradcam`); otherwise the setting (`describe_setting`) and
    the run's start time, so names are unique. A random-init model is marked in both.
    """
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    if context.multirun:
        marker = read_parent_marker(context.sweep_dir)
        swept = set(marker.get("swept_keys", [])) if marker else set()
        named = [o for o in context.task_overrides if o.split("=", 1)[0].lstrip("+~") in swept]
        mark = f"/{RANDOM_INIT}" if random_weights(cfg.model) else ""
        if named:
            return ",".join(sorted(named, key=_leading)) + mark
        if context.override_dirname:
            return context.override_dirname + mark
    return f"{describe_setting(cfg)}@{Path(context.output_dir).name}"


def run_tags(cfg: StudyConfig, context: JobContext) -> dict[str, str]:
    """Tags known before the model loads: method, precision, versions, commit, sweep facts."""
    versions = library_versions()
    tags = {
        "method": cfg.method.name,
        "reference": cfg.reference.name,
        "precision": cfg.precision,
        **{f"version.{name}": versions[name] for name in ("torch", "grad-cam", "lime", "xai-exp")},
    }
    commit = git_commit()
    if commit:
        tags["git_commit"] = tags["mlflow.source.git.commit"] = commit
    tags["mlflow.source.name"] = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "xai-exp"
    tags["mlflow.source.type"] = "LOCAL"
    with contextlib.suppress(Exception):  # no user name in some containers
        tags["mlflow.user"] = getpass.getuser()
    slurm_job = os.environ.get("SLURM_JOB_ID")
    if slurm_job:  # squeue's id (array_task), and how often SLURM requeued the job
        array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        tags["slurm.job_id"] = f"{array}_{task}" if array and task else slurm_job
        tags["slurm.restart_count"] = os.environ.get("SLURM_RESTART_COUNT", "0")
    if context.multirun:
        tags["sweep_dir"] = str(context.sweep_dir)
        tags["job_num"] = str(context.job_num)
        tags["overrides"] = context.override_dirname or "(none)"  # RunLogger masks secrets
    for group, choice in context.choices.items():
        tags[f"choice.{group}"] = str(choice)
    return tags


def model_tags(model: ModelFacts, cfg: StudyConfig) -> dict[str, str]:
    """Tags known once the model is known: what runs, and which implementation of each map."""
    return {
        "model": model.arch,
        "model_identity": model.identity,
        "model_family": model.family or "",
        "target_layer": model.target_layer_name,
        "device": model.device,
        "cam_implementation": model.cam_implementation(cfg.method.name, cfg.method.implementation),
        "lime_implementation": cfg.lime.implementation,
        "inference_engine": model.engine,
        "inference_threads": str(inference_threads(cfg.inference.threads).threads),
    }


def logged_config(cfg: StudyConfig) -> StudyConfig:
    """The config as logged: the tracking URI without its password."""
    tracking = dataclasses.replace(cfg.tracking, uri=redact_uri(cfg.tracking.uri))
    return dataclasses.replace(cfg, tracking=tracking)


# --------------------------------------------------------------------------- MLflow run

KILLED_MARKER = "killed_run.json"  # in the output folder: the run an interrupt closed
RESUMES_TAG = "resumes_run"  # on the run that reran the folder's study: the KILLED run's id
RESUMED_BY_TAG = "resumed_by"  # on the KILLED run: the id of the run that resumed it


def killed_run(out_dir: Path) -> str | None:
    """The run an interrupt closed in this output folder (a requeued SLURM job reruns there)."""
    try:
        return str(json.loads((out_dir / KILLED_MARKER).read_text())["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def link_resumed(run: RunLogger, previous: str, out_dir: Path) -> None:
    """Tag the KILLED run with the run that resumes it; the folder's marker is spent."""
    try:
        run.client.set_tag(previous, RESUMED_BY_TAG, run.run_id)
    except Exception as error:  # noqa: BLE001 - the link is a convenience, the run goes on
        log.warning("could not tag run %s as resumed: %s", previous, describe(error))
    (out_dir / KILLED_MARKER).unlink(missing_ok=True)


def start_run(
    store: tuple[MlflowClient, str], cfg: StudyConfig, context: JobContext, out_dir: Path
) -> RunLogger:
    """Create the MLflow run (a child when in a sweep) and log the resolved config."""
    client, experiment_id = store
    marker = read_parent_marker(context.sweep_dir) if context.multirun else None
    previous = killed_run(out_dir)
    resumes = {RESUMES_TAG: previous} if previous else {}
    try:
        mark_lost_runs(client, [experiment_id])
        run = RunLogger.start(
            client,
            experiment_id,
            run_name(cfg, context),
            {**run_tags(cfg, context), OUTPUT_DIR_TAG: str(out_dir), **resumes},
            parent_run_id=marker["run_id"] if marker else None,
        )
    except Exception as error:
        if server_lost(error):  # gone since `connect`: no run to close
            raise unreachable(cfg.tracking.uri, error, "start the server and run again") from error
        raise
    log.info(
        "MLflow run %s in experiment %r at %s",
        run.run_id,
        cfg.tracking.experiment,
        redact_uri(cfg.tracking.uri),
    )
    if previous:
        link_resumed(run, previous, out_dir)
        log.info("resuming the study of KILLED run %s (cached images are reused)", previous)
    shown = logged_config(cfg)
    run.log_params(flatten(dataclasses.asdict(shown)))
    run.log_artifact(atomic_write_text(out_dir / "config.yaml", config_yaml(shown)))
    return run


def config_yaml(cfg: StudyConfig) -> str:
    """The resolved config as YAML."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


class ImageLogger:
    """`ResultsWriter` hook: keeps the per-image series, logged in batches by `flush`.

    They are logged after the run-level metrics because MLflow's run page lists metrics in the
    order they were logged: the run's result comes first.
    """

    def __init__(self, run: RunLogger) -> None:
        self.run = run
        self.series: list[tuple[int, dict[str, float | bool | None]]] = []

    def __call__(self, index: int, result: ImageResult) -> None:
        values = {spec.image_metric: result.values[name] for name, spec in METRICS.items()
                  if result.values.get(name) is not None}  # fmt: skip
        self.series.append((index, values))

    def flush(self) -> None:
        """Log the kept series (step = image index) in batches; safe to call twice."""
        series, self.series = self.series, []
        self.run.log_series(series)


def mean_with_interval(summary: Mapping[str, float], name: str = "mean_iou") -> str:
    """``0.191 [0.152, 0.236]``: a mean and its 95% interval (n/a when there is no mean)."""
    mean = summary.get(name, math.nan)
    if math.isnan(mean):
        return "n/a"
    low, high = summary.get(f"{name}_ci_low", math.nan), summary.get(f"{name}_ci_high", math.nan)
    interval = "" if math.isnan(low) else f" [{low:.3f}, {high:.3f}] (95% CI)"
    return f"{mean:.3f}{interval}"


def run_note(cfg: StudyConfig, summary: Mapping[str, float], files: list[Path]) -> str:
    """The run's description in the MLflow UI (Markdown): setting, result, where to look."""
    shown = mean_with_interval(summary)
    small = interval_warning(int(summary.get("n_compared", 0)))
    return (
        f"**{cfg.method.name} vs {reference_label(cfg)}** on `{cfg.model.arch}` "
        f"(target layer `{cfg.model.target_layer}`), CAM top {cfg.threshold.cam_top_fraction:g}, "
        f"reference mask {cfg.threshold.lime_mode}.\n\n"
        f"Mean IoU **{shown}** over "
        f"{int(summary.get('n_compared', 0))} of "
        f"{int(summary.get('n_images', 0))} images "
        f"({int(summary.get('n_flagged', 0))} flagged, {int(summary.get('n_failed', 0))} failed); "
        f"agreement above chance **{mean_with_interval(summary, 'mean_iou_corrected')}** "
        f"(chance level {summary.get('mean_iou_chance', math.nan):.3f}: the IoU random masks of "
        "the same sizes score)."
        + (f" Careful: {small}." if small else "")
        + (f"\n\n**Random weights**: {RANDOM_NOTE}." if random_weights(cfg.model) else "")
        + "\n\nArtifacts: "
        + ", ".join(f"`{path.name}`" for path in files)
        + ", `overlays/`."
    )


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
    if files:
        run.log_artifacts(files[0].parent / OVERLAYS, OVERLAYS)
    table = pd.DataFrame([r.row() for r in results], columns=list(csv_columns()))
    run.log_table(table.astype(object).where(table.notna(), None), "results_table.json")


def log_partial(run: RunLogger, writer: ResultsWriter | None, error: BaseException) -> None:
    """Keep what finished before a failure: the results and overlays so far, and the reason."""
    try:
        run.set_tags({"error": describe(error, 500)})
        if writer is not None and writer.written(writer.csv_path):
            run.log_artifact(writer.csv_path)
            run.log_artifacts(writer.out_dir / OVERLAYS, OVERLAYS)
    except Exception as upload_error:  # noqa: BLE001 - never mask the original failure
        log.warning("could not log partial results: %s", describe(upload_error))


def where_to_look(
    cfg: StudyConfig,
    out_dir: Path,
    run: RunLogger | None,
    summary: Mapping[str, float] | None = None,
    view_key: str | None = None,
) -> str:
    """The block printed at the end of a run: the result, output folder, MLflow run and links.

    The agreement above chance; top-1 accuracy when the data had labels; intervals from few
    images and a random-init model are said so.
    """
    summary = summary or {}
    lines = []
    if "mean_iou" in summary:
        lines.append(f"  mean IoU       {mean_with_interval(summary)}")
    if not math.isnan(summary.get("mean_iou_corrected", math.nan)):
        chance = f"chance level {summary.get('mean_iou_chance', math.nan):.3f}"
        above = mean_with_interval(summary, "mean_iou_corrected")
        lines.append(f"  above chance   {above}, {chance}")
    small = interval_warning(int(summary.get("n_compared", MIN_INTERVAL_IMAGES)))
    if small:
        lines.append(f"  careful        {small}")
    if not math.isnan(summary.get("top1_accuracy", math.nan)):
        lines.append(f"  top-1 accuracy {mean_with_interval(summary, 'top1_accuracy')}")
    if random_weights(cfg.model):
        lines.append(f"  caution        {RANDOM_NOTE}")
    lines.append(f"  output folder  {out_dir}")
    if run is not None:
        lines.append(
            f"  MLflow run     {run.name} ({run.run_id}) in experiment {cfg.tracking.experiment!r}"
        )
        if not is_server(cfg.tracking.uri):
            lines.append(f"  browse with    mlflow ui --backend-store-uri {cfg.tracking.uri}")
        lines.append(f"  open           {run_url(cfg.tracking.uri, run.experiment_id, run.run_id)}")
        table = runs_table_url(cfg.tracking.uri, run.experiment_id, view_key)
        lines.append(f"  runs table     {table}")
    return "xai-exp: run finished\n" + "\n".join(lines)


# --------------------------------------------------------------------------- the job


class NothingComparedError(RuntimeError):
    """No image of the run could be compared: its mean IoU would be meaningless."""


class ServerLostError(TrackingError):
    """The tracking server stopped answering mid-run: the local results are complete, the
    run is closed by the next command that reaches the server (`tracking.mark_lost_runs`)."""


def server_lost_error(uri: str, out_dir: Path, run: RunLogger) -> ServerLostError:
    """The one line for a run whose server was lost: where the results are, what happens."""
    files = [name for name in ("results.csv", "summary.json") if (out_dir / name).is_file()]
    if (out_dir / OVERLAYS).is_dir():
        files.append(f"{OVERLAYS}/")
    listed = f" ({', '.join(files)})" if files else ""
    return ServerLostError(
        f"the tracking server at {redact_uri(uri)} stopped answering; the results are in "
        f"{out_dir}{listed}; the run {run.run_id} will be closed as FAILED the next time "
        "xai-exp reaches the server"
    )


def check_config(
    cfg: StudyConfig, cache: ExplanationCache | None = None, key: str | None = None
) -> Classifier | DeferredClassifier:
    """Everything beyond `validate` that would fail every image; returns the model.

    Plugins, the method, superpixel parameters, the data folder, the device and the model
    itself: it is loaded and its target layer checked by a dry forward pass. When `cache`
    holds the model's facts under `key` (`model_facts.facts_key`), they are checked instead
    and the network is loaded only when a prediction or a map is not cached.
    """
    load_plugins([*cfg.plugins, *cfg.metrics.plugins])
    check_method(cfg.method.name)
    explainer(cfg.reference.name).with_params(cfg.reference.params)
    check_segmentation(cfg.lime.segmentation.algorithm, cfg.lime.segmentation.params)
    data_source(cfg.data).check(cfg.data)
    facts = cached_facts(cache, key) if cache is not None else None
    if cache is None or key is None or facts is None:
        return load_model(cfg)
    facts.check_method(cfg.method.name)
    facts.check_method(cfg.reference.name, "reference")

    def build() -> tuple[Classifier, str]:
        classifier = load_model(cfg)
        return classifier, prepare_for_classifier(classifier, cfg, cache)

    return DeferredClassifier(
        facts, build, forget=lambda: cache.discard(FACTS_KIND, key, "stale model facts")
    )


def load_model(cfg: StudyConfig) -> Classifier:
    """The configured classifier, loaded now (torch is imported here), its method checked."""
    from xai_exp.models.classifier import load_classifier, resolve_device

    resolve_device(cfg.device)
    classifier = load_classifier(cfg.model, cfg.device)
    if classifier.family is not None:
        classifier.family.check_method(cfg.method.name)
        classifier.family.check_method(cfg.reference.name, "reference")
    return classifier


def check_overrides(cfg: StudyConfig, context: JobContext) -> None:
    """Overrides the composed config would ignore: an error, or a warning in a sweep (where
    another job of the sweep may use them)."""
    problems = ignored_overrides(cfg, context.task_overrides)
    if problems and not context.multirun:
        raise ConfigError("; ".join(problems))
    for problem in problems:
        log.warning("%s", problem)


@dataclass
class Job:
    """One study job's parts, made in `prepare` before any MLflow run exists."""

    cfg: StudyConfig
    context: JobContext
    store: tuple[MlflowClient, str] | None  # `connect`: client and experiment id
    cache: ExplanationCache
    images: ImageSet
    study: Study
    out_dir: Path
    run: RunLogger | None = None
    writer: ResultsWriter | None = None
    hook: ImageLogger | None = None
    reporter: SkipReporter | None = None


def execute(cfg: StudyConfig, context: JobContext) -> float:
    """Run one study and log it; returns the mean IoU.

    The config and the model are checked before anything else (`prepare`): a config error
    leaves no run behind. Once the tracking store answers, the run exists, so any later
    failure is recorded in it as FAILED (KILLED on an interrupt) with the reason, and the
    images finished so far are kept. A run in which no image could be compared is FAILED.
    """
    job = prepare(cfg, context)
    error: BaseException | None = None
    try:
        with deferred():  # an interrupt while the run is created arrives once it can be closed
            job.run = start_run(job.store, cfg, context, job.out_dir) if job.store else None
        job.writer, job.hook = open_outputs(job)
        seconds: dict[str, float] = {}  # loading: from the job's (process's) start
        if context.started is not None:
            seconds["loading"] = time.perf_counter() - context.started
        results = run_study(job.study, job.images, checked(job.writer), cfg.progress, seconds)
        summary = finish(job, results, seconds)
        report(job, results, summary)
        return summary["mean_iou"]
    except BaseException as caught:
        error = signals.prevailing(caught)  # an interrupt an exception replaced still stops it
        if error is not caught:
            raise error from caught
        raise
    finally:
        close(job, error)


def checked(writer: ResultsWriter) -> Callable[[int, ImageResult], None]:
    """The writer, then a check for an interrupt that a signal raised where Python ignored it
    (`signals.check`): it stops the study at the next image instead of never."""

    def write(index: int, result: ImageResult) -> None:
        writer(index, result)
        signals.check()

    return write


def prepare(cfg: StudyConfig, context: JobContext) -> Job:
    """Everything a job checks and opens before its MLflow run: the config, the store, the
    cache, the model (or its cached facts), the images (listed, not read) and the study."""
    honour_data_dir(cfg, context.task_overrides)
    validate(cfg)  # values and ranges, before the store is touched
    check_overrides(cfg, context)
    configure_threads(cfg.inference.threads)  # torch's, once it is loaded
    tracking = cfg.tracking
    store = connect(tracking.uri, tracking.experiment) if tracking.enabled else None  # fail fast
    cache = ExplanationCache(cfg.cache.dir, enabled=cfg.cache.enabled)
    key = facts_key(cfg) if cache.enabled else None
    model = check_config(cfg, cache, key)
    if random_weights(cfg.model):
        log.warning("model.weights=null and no checkpoint: %s", RANDOM_NOTE)
    images = open_images(cfg.data)  # listed, not read: listing problems refuse the run
    annotations = Annotations.open(cfg.data.masks_dir, cfg.data.boxes)
    if annotations is not None:
        images.annotate = annotations.object_mask
    study = Study(cfg, model, cache)
    if not isinstance(model, DeferredClassifier):
        store_facts(cache, key, study.facts)
    out_dir = Path(context.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return Job(cfg, context, store, cache, images, study, out_dir)


def open_outputs(job: Job) -> tuple[ResultsWriter, ImageLogger | None]:
    """The run's model tags, the skipped-file and label reports, and the writer of results."""
    cfg, study, images = job.cfg, job.study, job.images
    if job.run is not None:
        cached = {CACHE_DIR_TAG: str(job.cache.directory)} if job.cache.enabled else {}
        job.run.set_tags({**model_tags(study.facts, cfg), **cached})
    reporter = SkipReporter()
    for file in images.skipped:
        reporter(file)
    images.on_skip = reporter
    report_labels(images, study.classes, study.facts.arch)
    hook = ImageLogger(job.run) if job.run is not None else None
    writer = ResultsWriter(
        job.out_dir,
        cfg.method.name,
        hook,
        setting=describe_setting(cfg),
        plots=cfg.plots,
        overlays=OverlayPlan(overlay_cap(cfg.outputs.overlays), len(images)),
        figures=job.cache,
        random_weights=random_weights(cfg.model),
    )
    job.reporter = reporter
    return writer, hook


def finish(job: Job, results: list[ImageResult], seconds: dict[str, float]) -> dict[str, float]:
    """The run's summary, its files and their upload; NothingComparedError when no image
    could be compared."""
    cfg, study, images, run, writer = job.cfg, job.study, job.images, job.run, job.writer
    assert writer is not None
    if job.reporter is not None:
        job.reporter.close()
    if not results:
        raise no_valid_images(images, cfg.data.dir or "the bundled photos")
    started = time.perf_counter()
    summary = {
        **summary_metrics(results),
        "n_skipped_files": len(images.skipped),
        "explanations_computed": study.computed,
        "explanations_reused": study.reused,
        **{f"seconds_{phase}": value for phase, value in seconds.items()},
    }
    if not study.model.built:
        log.info("every prediction and map was cached: the model was not loaded")
    params = explanation_params(cfg, study.facts, study.versions)
    files = write_run_files(writer, params, summary, images.skipped)
    missing = writer.unwritten_line()
    if missing:
        where = "in MLflow (results_table.json)" if run is not None else "lost: tracking is off"
        log.warning("%s; their results are %s", missing, where)
    if run is not None and job.hook is not None:
        log_results(run, cfg.method.name, summary, files, results)
        job.hook.flush()
        run.set_tags({"mlflow.note.content": run_note(cfg, summary, files)})
        run.log_metrics({"seconds_finishing": time.perf_counter() - started})
    if results and summary["n_compared"] == 0:
        raise NothingComparedError(
            f"no image could be compared ({summary['n_flagged']} flagged, "
            f"{summary['n_failed']} failed); the reasons are in {writer.csv_path}"
        )
    return summary


def report(job: Job, results: list[ImageResult], summary: dict[str, float]) -> None:
    """The result in the log and the end block on the console."""
    cfg, run = job.cfg, job.run
    log.info(
        "%s vs %s: mean IoU %s over %d compared of %d images, median %.3f "
        "(%d computed, %d reused)%s",
        cfg.method.name,
        reference_label(cfg),
        mean_with_interval(summary),
        summary["n_compared"],
        len(results),
        summary["median_iou"],
        job.study.computed,
        job.study.reused,
        "; the model has random weights" if random_weights(cfg.model) else "",
    )
    log.info(
        "agreement above chance %s (chance level %.3f, ceiling %.3f: "
        "(IoU - chance) / (ceiling - chance))",
        mean_with_interval(summary, "mean_iou_corrected"),
        summary.get("mean_iou_chance", math.nan),
        summary.get("mean_iou_ceiling", math.nan),
    )
    if run is not None and run.lost is not None:
        raise server_lost_error(cfg.tracking.uri, job.out_dir, run)
    view = share_table_view(run.client, run.experiment_id) if run is not None else None
    print(where_to_look(cfg, job.out_dir, run, summary, view), flush=True)


def close(job: Job, error: BaseException | None) -> None:
    """Stop the study's workers and close the run: FINISHED, FAILED or KILLED with what
    finished; a Ctrl-C or SIGTERM now takes effect once the run is closed."""
    job.study.close()
    run, out_dir, uri = job.run, job.out_dir, job.cfg.tracking.uri
    if run is None:
        return
    # a Ctrl-C or SIGTERM now cannot leave the run RUNNING: it takes effect once the run is
    # closed (and stops a sweep there, at the first press)
    with deferred():
        if error is not None:
            log_partial(run, job.writer, error)
            if job.hook is not None:
                with contextlib.suppress(Exception):
                    job.hook.flush()  # the images finished before the failure
        status = terminal_status(error)
        run.finish(status)
        if isinstance(error, KeyboardInterrupt):  # the run a rerun here resumes
            with contextlib.suppress(OSError):
                atomic_write_text(out_dir / KILLED_MARKER, json.dumps({"run_id": run.run_id}))
        if run.lost is not None:  # the next command that reaches the server closes it
            write_lost_marker(out_dir, run, uri)
            if error is None:  # lost while closing the run
                raise server_lost_error(uri, out_dir, run)
        elif error is not None:
            log.warning("MLflow run %s marked %s (%s)", run.run_id, status, describe(error))
