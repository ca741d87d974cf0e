"""Compare the study's MLflow runs: group equal settings, summarise IoU, plot, HTML report.

Runs are read from any MLflow tracking URI (``sqlite:///...`` or ``http://...``). Sweep parent
runs (tag ``role=sweep``) are skipped; every other run is grouped by every setting that
changes results (all params but tracking, cache, progress, batch sizes and the metric switches),
and the table shows method and threshold plus each setting that varies. Only FINISHED runs
are pooled, and an image explained by several of them counts once, from the latest (a rerun
replaces, it does not double); failed, killed, lost (``process lost``) and still-running runs
are counted in ``unfinished_runs`` and left out of the means. Per-image values come from each
run's ``results.csv`` artifact, or, when a run has none, from its ``per_image/*`` metric
histories. ``std_iou`` is the population standard deviation (ddof=0) of the pooled per-image
IoUs, as in each run's own ``std_iou``.

Outputs, written to one folder: ``comparison.csv``, ``iou_vs_threshold.png`` and a
self-contained ``report.html``; with a parent run they are also logged to it under
``comparison/``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from xai_exp.cache import CACHE_DIR_TAG, ExplanationCache
from xai_exp.compare.method_agreement import (
    MATRIX_COLUMNS,
    ExplainerMaps,
    MapSource,
    agreement_matrix,
)
from xai_exp.compare.report import (
    GalleryItem,
    gallery_rows,
    gallery_size,
    render_html,
    settings_text,
)
from xai_exp.config import keys_without_results
from xai_exp.data.images import SUPPORTED_EXTENSIONS, safe_artifact_stem
from xai_exp.errors import describe
from xai_exp.evaluate.results import (
    FORMER_NAMES,
    METRICS,
    MetricSpec,
    Stat,
    Status,
    interval_names,
)
from xai_exp.evaluate.statistics import (
    MIN_INTERVAL_IMAGES,
    SIGNIFICANCE,
    interval_warning,
    mean_interval,
    paired_difference,
)
from xai_exp.explain.registry import display_name
from xai_exp.files import atomic_write_text
from xai_exp.outputs import plots
from xai_exp.outputs.writer import KEYS_CSV, inert_frame, plain_cell
from xai_exp.track.runs import (
    PARENT_TAG,
    RunLogger,
    is_sweep_parent,
    mark_lost_runs,
    open_store,
    quiet_downloads,
    redact_uri,
    resolve_experiment,
    resolve_run,
    run_url,
    search_all_runs,
)

log = logging.getLogger(__name__)

# Short names for the settings everybody compares; other params keep their dotted names.
ALIASES = {
    "method.name": "method",
    "reference.name": "reference",
    "threshold.cam_top_fraction": "cam_top_fraction",
    "threshold.lime_mode": "lime_mode",
    "lime.num_samples": "lime_samples",
}
ALWAYS_SHOWN = ("method", "cam_top_fraction")  # columns even when they do not vary
# Params that change no result (where runs are logged and cached, how work is batched, which
# metrics are switched on): the schema marks them (`xai_exp.config.NO_RESULT`).
NOT_SETTINGS = keys_without_results()
IOU_COLUMNS = ("mean_iou", *interval_names("mean_iou"), "std_iou", "min_iou", "max_iou")
CSV_NAME = "comparison.csv"
PLOT_NAME = "iou_vs_threshold.png"
HTML_NAME = "report.html"
GRID_NAME = "iou_per_image.csv"  # IoU per image (rows) and setting (columns)
PAIRED_NAME = "paired.csv"  # settings that differ in one key, compared on shared images
MATRIX_NAME = "method_agreement.csv"  # method x method (and LIME) agreement from cached maps
PAIRED_COLUMNS = (
    "metric",
    "differs_in",
    "a",
    "b",
    "others",
    "images",
    "mean_a",
    "mean_b",
    "mean_difference",
    "ci_low",
    "ci_high",
    "wilcoxon_p",
    "note",
)
ARTIFACT_DIR = "comparison"
CORRECTED = "iou_corrected"  # agreement above chance (`metrics.chance_corrected`)
LEAD_COLUMNS = ("mean_iou_corrected", *interval_names("mean_iou_corrected"))


def _group_stats(spec: MetricSpec) -> list[Stat]:
    """The statistics a group row shows for a metric other than IoU: its means and rates."""
    return [stat for stat in spec.stats if stat in (Stat.MEAN, Stat.RATE)]


def table_columns(settings: Sequence[str] = ALWAYS_SHOWN) -> tuple[str, ...]:
    """The comparison table's columns: the settings shown, then the metric registry's."""
    return (
        *settings,
        "runs",
        "unfinished_runs",
        "images",
        "compared",
        *IOU_COLUMNS,
        *(f"n_{status}" for status in Status),
        *(
            name
            for spec in METRICS.values()
            if spec.name != "iou"
            for stat in _group_stats(spec)
            for name in (spec.run_metric(stat), *interval_names(spec.run_metric(stat)))
        ),
    )


def image_columns() -> tuple[str, ...]:
    """The per-image columns read from a run (results.csv or the metric histories)."""
    return ("image", "artifact_stem", "status", "source", *METRICS)


class CompareError(RuntimeError):
    """The comparison cannot be made; the message is one line meant for the user."""


@dataclass
class Comparison:
    """The grouped table, the per-image rows behind it and the files written."""

    table: pd.DataFrame
    images: pd.DataFrame
    runs: list[Run]
    frame: pd.DataFrame  # `settings_frame` of the runs
    files: dict[str, Path] = field(default_factory=dict)
    paired: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(PAIRED_COLUMNS)))
    methods: pd.DataFrame = field(default_factory=pd.DataFrame)  # `method_agreement`
    verdict: Verdict | None = None  # best and worst setting (`verdict`)

    def findings(self) -> list[str]:
        """What a reader should take away first: the verdict and the small-sample warnings."""
        lines = self.verdict.lines() if self.verdict is not None else []
        counts = [int(n) for n in self.table["compared"] if n > 0]
        small = [n for n in counts if interval_warning(n)]
        if small and len(set(counts)) == 1:
            lines.append(f"every {interval_warning(small[0])}")
        elif small:
            lines.append(
                f"{len(small)} of {len(counts)} settings have intervals from fewer than "
                f"{MIN_INTERVAL_IMAGES} images (n = {', '.join(map(str, sorted(set(small))))}): "
                "each covers less than 95%"
            )
        return lines

    @property
    def settings(self) -> list[str]:
        """The settings shown as the table's first columns."""
        return shown_settings(self.frame)


def study_runs(
    client: MlflowClient, experiment_ids: Sequence[str], parent_run_id: str | None = None
) -> list[Run]:
    """The study runs of the experiments (or the children of one parent), parents skipped."""
    filter_string = f"tags.`{PARENT_TAG}` = '{parent_run_id}'" if parent_run_id else ""
    runs = search_all_runs(client, experiment_ids, filter_string)
    return [run for run in runs if not is_sweep_parent(run)]


# --------------------------------------------------------------------------- per-run data


def _parse(text: str) -> Any:
    """A param's value as the config had it: an int, a float, or the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _is_setting(key: str) -> bool:
    return not any(
        key == ignored or (ignored.endswith(".") and key.startswith(ignored))
        for ignored in NOT_SETTINGS
    )


REFERENCE_PARAMS = "reference.params"  # logged flat: reference.params.num_masks=2000, ...


def run_settings(run: Run) -> dict[str, Any]:
    """Every setting of a run that changes results, from its params (short names aliased;
    the reference explainer's params as one setting, ``reference_params``)."""
    params = run.data.params
    settings = {
        ALIASES.get(key, key): _parse(value)
        for key, value in params.items()
        if _is_setting(key) and not key.startswith(REFERENCE_PARAMS)
    }
    chosen = sorted(
        (key.removeprefix(f"{REFERENCE_PARAMS}."), value)
        for key, value in params.items()
        if key.startswith(f"{REFERENCE_PARAMS}.")
    )
    settings["reference_params"] = ", ".join(f"{key}={value}" for key, value in chosen)
    settings.setdefault("method", run.data.tags.get("method") or "unknown")
    settings.setdefault("reference", "lime")  # runs from before `reference=` compared with LIME
    settings.setdefault("cam_top_fraction", math.nan)
    return settings


def settings_frame(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per run: id, status, start time and every setting (missing ones NaN)."""
    return pd.DataFrame(
        [
            {
                "run_id": r.info.run_id,
                "run_status": r.info.status,
                "run_start": r.info.start_time,
                **run_settings(r),
            }
            for r in runs
        ]
    )


def shown_settings(frame: pd.DataFrame) -> list[str]:
    """The settings to show: method and threshold always, any other only when it varies."""
    keys = [c for c in frame.columns if c not in ("run_id", "run_status", "run_start")]
    varying = [k for k in keys if k not in ALWAYS_SHOWN and _distinct(frame[k]) > 1]
    if "reference_params" in varying and _implied(frame, "reference_params", "reference"):
        varying.remove("reference_params")  # each reference's own defaults: its name says it
    first = [k for k in ("lime_mode", "lime_samples") if k in varying]
    return [*ALWAYS_SHOWN, *first, *sorted(k for k in varying if k not in first)]


def _implied(frame: pd.DataFrame, key: str, by: str) -> bool:
    """Each value of `by` goes with one value of `key` in the frame."""
    if by not in frame:
        return False
    return all(_distinct(group) <= 1 for _, group in frame.groupby(frame[by].map(repr))[key])


def _distinct(series: pd.Series) -> int:
    return len({"<missing>" if pd.isna(v) else repr(v) for v in series})


def comparison_title(frame: pd.DataFrame, most: int = 6) -> str:
    """What was compared, for the report's title, from the runs' `settings_frame`:
    ``gradcam vs LIME: CAM top 5% vs 10% vs 20% on bundled, efficientnet_lite0``."""
    if frame.empty:
        return "xai-exp comparison: no runs"
    names = {"cam_top_fraction": "CAM top", "lime_samples": "LIME samples", "lime_mode": "LIME"}

    def values(key: str) -> list[Any]:
        found = {repr(v): v for v in frame[key] if not pd.isna(v)} if key in frame else {}
        return sorted(found.values(), key=_sort_key)

    def text(key: str, value: Any) -> str:
        if key == "cam_top_fraction":
            return f"{value * 100:g}%"
        return f"{value:g}" if isinstance(value, float) else str(value)

    methods = " vs ".join(str(m) for m in values("method")) or "CAM"
    references = " vs ".join(display_name(str(r)) for r in values("reference"))
    varying = [
        k
        for k in shown_settings(frame)
        if k not in ("method", "reference") and _distinct(frame[k]) > 1
    ]
    parts = []
    for key in (varying or ["cam_top_fraction"])[:3]:
        shown = [text(key, v) for v in values(key)]
        if len(shown) > most:
            shown = [*shown[: most - 1], "…", shown[-1]]
        if shown:
            parts.append(f"{names.get(key, key)} {' vs '.join(shown)}")
    if len(varying) > 3:
        more = len(varying) - 3
        parts.append(f"{more} more setting{'s' if more > 1 else ''}")
    shared = []
    if "data.dir" not in varying and "data.source" not in varying:
        folders = [str(v) for v in values("data.dir") if v != "null"]
        shared.append(Path(folders[0]).name if len(folders) == 1 else "bundled")
    if "model.arch" not in varying and len(archs := values("model.arch")) == 1:
        weights = values("model.weights")
        random = weights == ["null"] and values("model.checkpoint") in ([], ["null"])
        shared.append(f"{archs[0]}{' (random weights)' if random else ''}")
    where = f" on {', '.join(shared)}" if shared else ""
    versus = f"{methods} vs {references or display_name('lime')}"
    return versus + (": " + "; ".join(parts) if parts else "") + where


def _sort_key(value: Any) -> tuple:
    """Sorts numbers numerically, then text, missing values last."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return (2, 0, "")
    if isinstance(value, int | float):
        return (0, value, "")
    return (1, 0, str(value))


def run_label(run: Run) -> str:
    """Run name, or the run id when it has none."""
    return run.info.run_name or run.data.tags.get("mlflow.runName") or run.info.run_id


def _column(frame: pd.DataFrame, name: str, default: Any) -> pd.Series:
    if name in frame.columns:
        return frame[name]
    return pd.Series([default] * len(frame), index=frame.index, dtype=object)


def _numeric(series: pd.Series) -> pd.Series:
    """Numbers from CSV text; ``True``/``False`` (boolean metrics) become 1/0."""
    return pd.to_numeric(series.replace({"True": "1", "False": "0"}), errors="coerce")


def _images_from_csv(path: Path) -> pd.DataFrame:
    """Per-image rows from a results.csv (strings kept as written: an image named NA stays NA)."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False).map(plain_cell)
    return pd.DataFrame(
        {
            "image": _column(frame, "image", "").astype(str),
            "artifact_stem": _column(frame, "artifact_stem", "").astype(str),
            "status": _column(frame, "status", "").astype(str).replace("", Status.OK.value),
            "source": "results.csv",
            **{name: _numeric(_column(frame, _stored(frame, name), "")) for name in METRICS},
        }
    )


def _stored(frame: pd.DataFrame, name: str) -> str:
    """The column a metric has in a results.csv: its name, or its name before #20."""
    old = FORMER_NAMES.get(name)
    return old if name not in frame and old is not None and old in frame else name


def _images_from_history(client: MlflowClient, run: Run) -> pd.DataFrame:
    """Per-image rows rebuilt from the ``per_image/*`` metric histories (step = image index).

    A step with an IoU is ``ok``; a step with other values but no IoU is ``flagged`` (its IoU
    was None, which is not logged); failed images log nothing, so the run's ``n_failed`` metric
    adds that many ``error`` rows.
    """
    run_id = run.info.run_id

    def history(spec: MetricSpec) -> dict[int, float]:
        found = client.get_metric_history(run_id, spec.image_metric)
        found = found or client.get_metric_history(run_id, f"image_{spec.name}")  # before 0.2
        old = FORMER_NAMES.get(spec.name)
        if not found and old is not None:  # logged before #20
            found = client.get_metric_history(run_id, spec.image_metric.replace(spec.name, old))
        return {m.step: m.value for m in found}

    series = {name: history(spec) for name, spec in METRICS.items()}
    steps = sorted(set().union(*(found.keys() for found in series.values())))
    rows = [
        {
            "image": f"image #{step}",
            "artifact_stem": "",
            "status": (Status.OK if step in series["iou"] else Status.FLAGGED).value,
            "source": "metric history",
            **{name: found.get(step, math.nan) for name, found in series.items()},
        }
        for step in steps
    ]
    failed = run.data.metrics.get("n_failed", 0.0)
    failed = int(failed) if math.isfinite(failed) else 0
    rows += [
        {
            "image": f"failed image {n + 1}",
            "artifact_stem": "",
            "status": Status.ERROR.value,
            "source": "metric history",
            **{name: math.nan for name in METRICS},
        }
        for n in range(failed)
    ]
    return pd.DataFrame(rows, columns=list(image_columns()))


def run_images(client: MlflowClient, run: Run, workdir: Path) -> pd.DataFrame:
    """The per-image rows of one run, tagged with the run and its settings."""
    run_id = run.info.run_id
    names = {info.path for info in client.list_artifacts(run_id)}
    if "results.csv" in names:
        local = client.download_artifacts(run_id, "results.csv", str(workdir / run_id))
        frame = _images_from_csv(Path(local))
    else:
        frame = _images_from_history(client, run)
    frame.insert(0, "run_status", run.info.status)
    frame.insert(0, "run_name", run_label(run))
    frame.insert(0, "run_id", run_id)
    return frame


def collect_images(client: MlflowClient, runs: Sequence[Run], workdir: Path) -> pd.DataFrame:
    """Per-image rows of all runs, one table with a fresh index."""
    frames = [run_images(client, run, workdir) for run in runs]
    frames = [f for f in frames if not f.empty]
    if not frames:
        columns = ["run_id", "run_name", "run_status", *image_columns()]
        return pd.DataFrame(columns=columns)
    images = pd.concat(frames, ignore_index=True)
    images["iou"] = images["iou"].astype(float)
    return images


# --------------------------------------------------------------------------- grouping


def _mean(series: pd.Series) -> float:
    values = pd.to_numeric(series, errors="coerce").dropna()
    return float(values.mean()) if len(values) else math.nan


def summarize_groups(
    runs: Sequence[Run], images: pd.DataFrame, frame: pd.DataFrame | None = None
) -> pd.DataFrame:
    """One row per distinct setting: run and image counts, IoU statistics, statuses, metrics.

    Runs are grouped by every setting that changes results (`run_settings`); only FINISHED
    runs are pooled, and an image that several of them explain counts once, from the latest
    run (a rerun replaces, it does not double). The shown settings are the table's first
    columns (`shown_settings`). `frame` is the runs' `settings_frame` when the caller has it.
    """
    frame = settings_frame(runs) if frame is None else frame
    shown = shown_settings(frame)
    keys = [c for c in frame.columns if c not in ("run_id", "run_status", "run_start")]
    grouping = frame[keys].map(lambda v: "<missing>" if pd.isna(v) else repr(v))
    rows = []
    for _, members in frame.groupby([grouping[k] for k in keys], dropna=False, sort=False):
        finished = members[members["run_status"] == "FINISHED"]  # the others are listed apart
        part = latest_per_image(images, finished)
        iou = part["iou"].dropna()
        row = {key: members[key].iloc[0] for key in shown}
        row.update(
            runs=int(finished["run_id"].nunique()),
            unfinished_runs=int((members["run_status"] != "FINISHED").sum()),
            images=len(part),
            compared=len(iou),
            mean_iou=float(iou.mean()) if len(iou) else math.nan,
            **dict(zip(interval_names("mean_iou"), mean_interval(iou), strict=True)),
            std_iou=float(iou.std(ddof=0)) if len(iou) else math.nan,
            min_iou=float(iou.min()) if len(iou) else math.nan,
            max_iou=float(iou.max()) if len(iou) else math.nan,
        )
        for status in Status:
            row[f"n_{status}"] = int((part["status"] == status.value).sum())
        for spec in METRICS.values():
            if spec.name == "iou":
                continue
            values = pd.to_numeric(part[spec.name], errors="coerce") if spec.name in part else None
            mean = _mean(values) if values is not None else math.nan
            bounds = mean_interval(values) if values is not None else (math.nan, math.nan)
            for stat in _group_stats(spec):
                row[spec.run_metric(stat)] = mean
                row.update(zip(interval_names(spec.run_metric(stat)), bounds, strict=True))
        rows.append(row)
    table = pd.DataFrame(rows, columns=list(table_columns(shown)))
    unused = [
        name
        for spec in METRICS.values()
        if not spec.reported_when_missing
        for name in spec.run_metrics
        if name in table and table[name].isna().all()
    ]
    table = table.drop(columns=unused)  # only the metrics the runs computed
    if "lime_samples" in table:
        table["lime_samples"] = table["lime_samples"].astype("Int64")
    order = [k for k in shown if k != "cam_top_fraction"] + ["cam_top_fraction"]
    table = table.sort_values(order, key=lambda column: column.map(_sort_key), kind="mergesort")
    return lead_with_corrected(table.reset_index(drop=True))


def differ_in_area(table: pd.DataFrame, tolerance: float = 0.1) -> bool:
    """Whether the settings' masks differ in size enough to move raw IoU: their mean chance
    levels span more than `tolerance` of the largest."""
    if "mean_iou_chance" not in table:
        return False
    chance = pd.to_numeric(table["mean_iou_chance"], errors="coerce").dropna()
    return len(chance) > 1 and float(chance.max() - chance.min()) > tolerance * float(chance.max())


def lead_with_corrected(table: pd.DataFrame) -> pd.DataFrame:
    """The table with agreement above chance before raw IoU when the settings differ in mask
    size (raw IoU would rank their areas)."""
    if not differ_in_area(table) or not all(c in table for c in LEAD_COLUMNS):
        return table
    columns = [c for c in table.columns if c not in LEAD_COLUMNS]
    at = columns.index("mean_iou")
    return table[[*columns[:at], *LEAD_COLUMNS, *columns[at:]]]


def latest_per_image(images: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """The image rows of `runs`, each image once: from the latest run that has it."""
    part = images[images["run_id"].isin(set(runs["run_id"]))]
    start = part["run_id"].map(dict(zip(runs["run_id"], runs["run_start"], strict=True)))
    ordered = part.assign(_start=start).sort_values("_start", kind="mergesort")
    return ordered.drop_duplicates(subset=["image"], keep="last").drop(columns="_start")


def terminal_view(table: pd.DataFrame) -> pd.DataFrame:
    """The table for a terminal: the intervals of `mean_iou` and of the agreement above chance
    only (every one is in the CSV)."""
    keep = {*interval_names("mean_iou"), *interval_names("mean_iou_corrected")}
    return table[[c for c in table.columns if not c.endswith(("_ci_low", "_ci_high")) or c in keep]]


def format_table(table: pd.DataFrame) -> str:
    """The table as fixed-width text for a terminal."""
    if table.empty:
        return "(no runs)"

    def fixed(digits: int):
        return lambda v: "-" if pd.isna(v) else f"{v:.{digits}f}"

    formatters = {
        **{name: fixed(3) for name in table.columns if table[name].dtype.kind == "f"},
        "cam_top_fraction": lambda v: "-" if pd.isna(v) else f"{v:g}",
        "lime_samples": lambda v: "-" if pd.isna(v) else str(int(v)),
    }
    return table.to_string(index=False, formatters=formatters, na_rep="-")


# --------------------------------------------------------------------------- outputs


def _stem_candidates(row: pd.Series) -> list[str]:
    image = str(row["image"])
    candidates = [str(row.get("artifact_stem") or "")]
    base, ext = os.path.splitext(image)
    if ext.lower() in SUPPORTED_EXTENSIONS and base:
        candidates += [safe_artifact_stem(base), safe_artifact_stem(f"{base}_{ext[1:]}")]
    candidates.append(safe_artifact_stem(image))
    return [c for c in dict.fromkeys(candidates) if c]


class _Overlays:
    """Finds and downloads a run's overlay PNG for an image (listing each run once)."""

    def __init__(self, client: MlflowClient, workdir: Path) -> None:
        self.client = client
        self.workdir = workdir
        self.listings: dict[str, set[str]] = {}

    def png(self, row: pd.Series) -> bytes | None:
        run_id = row["run_id"]
        if run_id not in self.listings:
            try:
                found = self.client.list_artifacts(run_id, "overlays")
            except (MlflowException, OSError):
                found = []
            self.listings[run_id] = {info.path for info in found if not info.is_dir}
        for stem in _stem_candidates(row):
            path = f"overlays/{stem}.png"
            if path in self.listings[run_id]:
                target = self.workdir / "overlays" / run_id
                target.mkdir(parents=True, exist_ok=True)
                return Path(self.client.download_artifacts(run_id, path, str(target))).read_bytes()
        return None


def setting_groups(comparison: Comparison) -> list[tuple[dict[str, Any], pd.DataFrame]]:
    """Each compared setting (shown keys and values) with its image rows: per image the latest
    finished run's."""
    frame = comparison.frame
    finished = frame[frame["run_status"] == "FINISHED"]
    if finished.empty:
        return []
    keys = comparison.settings
    grouping = finished[keys].map(lambda v: "<missing>" if pd.isna(v) else repr(v))
    return [
        (members[keys].iloc[0].to_dict(), latest_per_image(comparison.images, members))
        for _, members in finished.groupby([grouping[k] for k in keys], sort=False)
    ]


def iou_grid(comparison: Comparison) -> pd.DataFrame:
    """IoU per image (rows) and compared setting (columns), from each setting's latest runs."""
    groups = setting_groups(comparison)
    if not groups:
        return pd.DataFrame()
    parts = [rows.assign(setting=settings_text(shown)) for shown, rows in groups]
    rows = pd.concat(parts, ignore_index=True)
    return rows.pivot_table(index="image", columns="setting", values="iou", sort=False)


def _same(a: Any, b: Any) -> bool:
    return (pd.isna(a) and pd.isna(b)) if (pd.isna(a) or pd.isna(b)) else a == b


def paired_comparisons(
    comparison: Comparison, metrics: Sequence[str] = (CORRECTED, "iou")
) -> pd.DataFrame:
    """Every two settings that differ in one shown setting, on the images both compared.

    Per metric and pair: the mean of each (a, b: the differing values, in sorted order), the
    mean paired difference a - b with its 95% bootstrap interval and the Wilcoxon signed-rank
    p-value (`statistics.paired_difference`: none, and a note, where there are too few images
    to test). `others` names the settings both share. Agreement above chance comes first.
    """
    groups = setting_groups(comparison)
    rows = []
    pairs = list(itertools.combinations(groups, 2))
    for metric, ((first, first_rows), (second, second_rows)) in itertools.product(metrics, pairs):
        if metric not in first_rows or metric not in second_rows:
            continue
        differing = [key for key in first if not _same(first[key], second.get(key))]
        if len(differing) != 1:
            continue
        [key] = differing
        if _sort_key(second[key]) < _sort_key(first[key]):
            (first, first_rows), (second, second_rows) = (second, second_rows), (first, first_rows)
        joined = first_rows.set_index("image")[[metric]].join(
            second_rows.set_index("image")[[metric]], how="inner", rsuffix="_b"
        )
        found = paired_difference(joined[metric], joined[f"{metric}_b"])
        if found.images < 2:
            continue
        others = {k: v for k, v in first.items() if k != key}
        rows.append(
            {
                "metric": metric,
                "differs_in": key,
                "a": first[key],
                "b": second[key],
                "others": settings_text(others),
                **dataclasses.asdict(found),
            }
        )
    return pd.DataFrame(rows, columns=list(PAIRED_COLUMNS))


@dataclass(frozen=True)
class Standing:
    """One setting's mean of the verdict's metric, with its interval and image count."""

    label: str
    mean: float
    low: float
    high: float
    images: int
    chance: float  # mean chance-level IoU of its masks
    raw: float  # mean raw IoU

    def value_text(self) -> str:
        """``0.105 [0.061, 0.150], n = 10``."""
        interval = "" if math.isnan(self.low) else f" [{self.low:.3f}, {self.high:.3f}]"
        return f"{self.mean:.3f}{interval}, n = {self.images}"

    def text(self) -> str:
        """``threshold=top5 (0.105 [0.061, 0.150], n = 10)``."""
        return f"{self.label} ({self.value_text()})"


@dataclass(frozen=True)
class Verdict:
    """Which setting agrees best and worst, whether they differ, and how much is mask area."""

    metric: str  # CORRECTED, or "iou" for stores without chance levels
    best: Standing
    worst: Standing
    difference: Any  # statistics.PairedDifference on their shared images, None without any
    area: str  # a sentence when raw IoU's ranking is mask area, else ""

    @property
    def differ(self) -> bool | None:
        """Whether best and worst differ at the 5% level (None: not testable)."""
        found = self.difference
        if found is None or math.isnan(found.wilcoxon_p):
            return None
        return found.wilcoxon_p < SIGNIFICANCE

    @property
    def measure(self) -> str:
        return "agreement above chance" if self.metric == CORRECTED else "mean IoU"

    def lines(self) -> list[str]:
        """The verdict in sentences, for the terminal, the report and the parent run."""
        lines = [
            f"best {self.measure}: {self.best.text()}",
            f"worst {self.measure}: {self.worst.text()}",
        ]
        found = self.difference
        if found is None:
            lines.append("no shared images: best and worst cannot be tested as pairs")
        elif self.differ is None:
            lines.append(f"best vs worst: {found.note or 'not testable'}")
        else:
            verb = "differ" if self.differ else "do not differ significantly"
            lines.append(
                f"best vs worst {verb}: difference {found.mean_difference:+.3f} "
                f"[{found.ci_low:.3f}, {found.ci_high:.3f}], Wilcoxon p = {found.wilcoxon_p:.3g}, "
                f"n = {found.images}" + (f" ({found.note})" if found.note else "")
            )
        if self.area:
            lines.append(self.area)
        return lines


def _label(shown: Mapping[str, Any], varying: Sequence[str]) -> str:
    return settings_text({k: v for k, v in shown.items() if k in varying} or shown)


def verdict(comparison: Comparison) -> Verdict | None:
    """Best and worst setting by agreement above chance (raw IoU for older runs), tested on
    their shared images, and the area sentence; None with fewer than two settings."""
    groups = [(shown, rows) for shown, rows in setting_groups(comparison) if len(rows)]
    if len(groups) < 2:
        return None
    varying = [
        key for key in comparison.settings if len({repr(shown.get(key)) for shown, _ in groups}) > 1
    ]

    def mean(rows: pd.DataFrame, metric: str) -> float:
        return _mean(rows[metric]) if metric in rows else math.nan

    have_corrected = all(not math.isnan(mean(rows, CORRECTED)) for _, rows in groups)
    metric = CORRECTED if have_corrected else "iou"
    standings = []
    for shown, rows in groups:
        values = pd.to_numeric(rows[metric], errors="coerce").dropna()
        low, high = mean_interval(values)
        standings.append(
            (
                Standing(
                    _label(shown, varying),
                    mean(rows, metric),
                    low,
                    high,
                    len(values),
                    mean(rows, "iou_chance"),
                    mean(rows, "iou"),
                ),
                rows,
            )
        )
    scored = [item for item in standings if not math.isnan(item[0].mean)]
    if len(scored) < 2:
        return None
    (best, best_rows), (worst, worst_rows) = (
        max(scored, key=lambda item: item[0].mean),
        min(scored, key=lambda item: item[0].mean),
    )
    joined = best_rows.set_index("image")[[metric]].join(
        worst_rows.set_index("image")[[metric]], how="inner", rsuffix="_worst"
    )
    found = paired_difference(joined[metric], joined[f"{metric}_worst"])
    difference = found if found.images >= 2 else None
    area = ""
    if metric == CORRECTED and differ_in_area(comparison.table):
        area = area_sentence([item[0] for item in scored])
    return Verdict(metric, best, worst, difference, area)


def area_sentence(standings: Sequence[Standing]) -> str:
    """How much of raw IoU's spread between its best and worst setting is the chance level of
    their mask sizes, and whether agreement above chance keeps that order."""
    raw_best = max(standings, key=lambda item: item.raw)
    raw_worst = min(standings, key=lambda item: item.raw)
    spread = raw_best.raw - raw_worst.raw
    if spread <= 0 or math.isnan(raw_best.chance) or math.isnan(raw_worst.chance):
        return ""
    share = (raw_best.chance - raw_worst.chance) / spread
    text = (
        f"Raw IoU ranks {raw_best.label} above {raw_worst.label} ({raw_best.raw:.3f} vs "
        f"{raw_worst.raw:.3f}), but random masks of the same sizes score {raw_best.chance:.3f} vs "
        f"{raw_worst.chance:.3f}: mask area accounts for "
        + ("all" if share >= 0.995 else f"{max(share, 0.0):.0%}")
        + " of that difference"
    )
    reversed_order = raw_best.mean <= raw_worst.mean
    if reversed_order or share >= 0.5:
        above = f"{raw_best.mean:.3f} vs {raw_worst.mean:.3f}"
        order = "does not keep that order" if reversed_order else "narrows it"
        return (
            f"{text}, and agreement above chance {order} ({above}): "
            "the raw ranking is mostly mask area."
        )
    return f"{text}."


def _run_keys(client: MlflowClient, run: Run, workdir: Path) -> dict[str, dict[str, str]]:
    """A run's explanation_keys.csv: image -> cache keys (empty when the run has none)."""
    run_id = run.info.run_id
    try:
        names = {info.path for info in client.list_artifacts(run_id)}
        if KEYS_CSV not in names:
            return {}
        local = client.download_artifacts(run_id, KEYS_CSV, str(workdir / "keys" / run_id))
    except (MlflowException, OSError):
        return {}
    frame = pd.read_csv(local, dtype=str, keep_default_na=False).map(plain_cell)
    if "lime" in frame and "reference" not in frame:  # written before #20
        frame = frame.rename(columns={"lime": "reference"})
    return {row["image"]: {k: row[k] for k in ("cam", "segments", "reference")} for _, row in
            frame.iterrows()}  # fmt: skip


def method_agreement(client: MlflowClient, comparison: Comparison, workdir: Path) -> pd.DataFrame:
    """For settings that differ only in the CAM method or the reference: every pair of the
    explainers they ran (CAMs, LIME, KernelSHAP, RISE, ...), mean top-f IoU and Spearman on
    their shared images, from the runs' cached maps (`method_agreement.agreement_matrix`).
    `others` names the shared settings."""
    explainers = ("method", "reference")
    groups = [(shown, rows) for shown, rows in setting_groups(comparison) if "method" in shown]
    clusters: dict[str, list[tuple[dict[str, Any], pd.DataFrame]]] = {}
    for shown, rows in groups:
        others = {k: v for k, v in shown.items() if k not in explainers}
        clusters.setdefault(settings_text(others), []).append((shown, rows))
    runs = {run.info.run_id: run for run in comparison.runs}
    keys: dict[str, dict[str, dict[str, str]]] = {}
    caches: dict[str, ExplanationCache] = {}
    tables = []
    for label, members in clusters.items():
        cams: dict[str, ExplainerMaps] = {}
        references: dict[str, ExplainerMaps] = {}
        for _shown, rows in members:
            found: dict[str, MapSource] = {}
            reference = "lime"
            for run_id, image in zip(rows["run_id"], rows["image"], strict=True):
                if run_id not in keys:
                    keys[run_id] = _run_keys(client, runs[run_id], workdir)
                reference = runs[run_id].data.params.get("reference.name", "lime")
                folder = runs[run_id].data.tags.get(CACHE_DIR_TAG)
                if folder is None or image not in keys[run_id]:
                    continue
                cache = caches.setdefault(folder, ExplanationCache(folder))
                found[image] = MapSource(cache, keys[run_id][image])
            cams.setdefault(rows_method(rows, runs), ExplainerMaps(found, "cam"))
            references.setdefault(display_name(reference), ExplainerMaps(found, "reference"))
        sources = {name: cams[name] for name in sorted(cams)}  # CAMs first, then references
        sources.update({k: references[k] for k in sorted(references) if k not in sources})
        if len(sources) < 3:  # one CAM and one reference: the table's own IoU says it
            continue
        fraction = float(members[0][0].get("cam_top_fraction", 0.1))
        table = agreement_matrix(sources, fraction)
        tables.append(table.assign(others=label, cam_top_fraction=fraction))
    if not tables:
        return pd.DataFrame(columns=["others", "cam_top_fraction", *MATRIX_COLUMNS])
    found_all = pd.concat(tables, ignore_index=True)
    return found_all[["others", "cam_top_fraction", *MATRIX_COLUMNS]]


def rows_method(rows: pd.DataFrame, runs: Mapping[str, Run]) -> str:
    """The CAM method of a setting's runs."""
    run = runs[str(rows["run_id"].iloc[0])]
    return run.data.params.get("method.name") or run.data.tags.get("method") or "unknown"


def write_outputs(
    client: MlflowClient,
    comparison: Comparison,
    out_dir: Path,
    workdir: Path,
    title: str,
    meta: Sequence[str],
    tracking_uri: str = "",
) -> dict[str, Path]:
    """comparison.csv, iou_per_image.csv, iou_vs_threshold.png and report.html in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / CSV_NAME
    inert_frame(comparison.table).to_csv(csv_path, index=False)
    figure = plots.iou_vs_threshold(comparison.table, comparison.settings)
    plot_path = plots.save_figure(figure, out_dir / PLOT_NAME)
    overlays = _Overlays(client, workdir)
    experiments = {run.info.run_id: run.info.experiment_id for run in comparison.runs}
    groups = setting_groups(comparison)  # the best and worst images of each setting
    gallery = [
        GalleryItem(
            kind=kind,
            run_id=row["run_id"],
            run_name=row["run_name"],
            image=str(row["image"]),
            iou=float(row["iou"]),
            settings=settings_text(setting),
            png=overlays.png(row),
            url=run_url(tracking_uri, experiments[row["run_id"]], row["run_id"])
            if tracking_uri
            else None,
        )
        for setting, rows in groups
        for kind, row in gallery_rows(rows, gallery_size(len(groups)))
    ]
    grid = iou_grid(comparison)
    grid_path = out_dir / GRID_NAME
    inert_frame(grid).to_csv(grid_path)
    paired_path = out_dir / PAIRED_NAME
    inert_frame(comparison.paired).to_csv(paired_path, index=False)
    comparison.methods = method_agreement(client, comparison, workdir)
    matrix_path = out_dir / MATRIX_NAME
    inert_frame(comparison.methods).to_csv(matrix_path, index=False)
    page = render_html(
        title,
        meta,
        comparison.findings(),
        comparison.table,
        plot_path.read_bytes(),
        gallery,
        grid,
        comparison.paired,
        comparison.methods,
    )
    html_path = atomic_write_text(out_dir / HTML_NAME, page)
    comparison.files = {
        "csv": csv_path,
        "paired": paired_path,
        "methods": matrix_path,
        "grid": grid_path,
        "plot": plot_path,
        "html": html_path,
    }
    return comparison.files


def build_comparison(
    client: MlflowClient,
    runs: Sequence[Run],
    out_dir: Path,
    meta: Sequence[str] = (),
    tracking_uri: str = "",
) -> Comparison:
    """Read the runs' per-image results, group them and write the files, under a title that
    says what was compared (`comparison_title`)."""
    runs = [r for r in runs if not is_sweep_parent(r)]
    if not runs:
        raise CompareError("no study runs to compare")
    with tempfile.TemporaryDirectory(prefix="xai-exp-compare-") as tmp, quiet_downloads():
        workdir = Path(tmp)
        images = collect_images(client, runs, workdir)
        frame = settings_frame(runs)
        title = comparison_title(frame)
        comparison = Comparison(summarize_groups(runs, images, frame), images, list(runs), frame)
        comparison.paired = paired_comparisons(comparison)
        comparison.verdict = verdict(comparison)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        full_meta = [
            *meta,
            f"{len(runs)} runs, {len(images)} image results, generated {stamp}",
            "std_iou: population std (ddof=0) of the per-image IoUs pooled over a group's runs",
        ]
        write_outputs(client, comparison, out_dir, workdir, title, full_meta, tracking_uri)
    return comparison


def log_files(client: MlflowClient, run_id: str, files: Mapping[str, Path]) -> None:
    """Upload the comparison files to a run under ``comparison/``."""
    for path in files.values():
        client.log_artifact(run_id, str(path), ARTIFACT_DIR)


# --------------------------------------------------------------------------- entry points


def compare(
    tracking_uri: str,
    experiment: str = "xai-exp",
    parent_run_id: str | None = None,
    out_dir: Path = Path("comparison"),
) -> Comparison:
    """The CLI's work: read the runs, write the files, log them to the parent when given."""
    client = open_store(tracking_uri)
    parent = None
    if parent_run_id:
        parent = resolve_run(client, tracking_uri, parent_run_id)
        experiment_ids = [parent.info.experiment_id]
        scope = f"children of run {parent_run_id} ({run_label(parent)})"
    else:
        experiment_ids = [resolve_experiment(client, tracking_uri, experiment)]
        scope = f"experiment {experiment!r}"
    try:
        mark_lost_runs(client, experiment_ids)
    except MlflowException as error:  # a read-only store: compare still reads it
        log.warning("could not mark lost runs: %s", describe(error))
    runs = study_runs(client, experiment_ids, parent.info.run_id if parent else None)
    if not runs:
        raise CompareError(f"no study runs to compare in {scope} at {redact_uri(tracking_uri)}")
    meta = [scope, f"tracking URI: {redact_uri(tracking_uri)}"]
    comparison = build_comparison(client, runs, Path(out_dir), meta, tracking_uri)
    if parent is not None:
        log_files(client, parent.info.run_id, comparison.files)
    return comparison


def log_comparison_to_parent(
    parent: RunLogger, children: list[Run], sweep_dir: Path | None, tracking_uri: str = ""
) -> Comparison:
    """Sweep callback hook: compare the children and log the files to the parent run.

    The files go to ``<sweep_dir>/comparison/`` (kept next to the sweep's job folders), or to
    a temporary folder when there is no sweep dir.
    """
    client = parent.client
    meta = [f"sweep run {parent.run_id}", *([f"sweep dir: {sweep_dir}"] if sweep_dir else [])]
    if sweep_dir is not None:
        out_dir = Path(sweep_dir) / ARTIFACT_DIR
        comparison = build_comparison(client, children, out_dir, meta, tracking_uri)
        log_files(client, parent.run_id, comparison.files)
        return comparison
    with tempfile.TemporaryDirectory(prefix="xai-exp-comparison-") as tmp:
        comparison = build_comparison(client, children, Path(tmp), meta, tracking_uri)
        log_files(client, parent.run_id, comparison.files)
    return comparison
