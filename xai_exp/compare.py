"""Compare the study's MLflow runs: group equal settings, summarise IoU, plot, HTML report.

Runs are read from any MLflow tracking URI (``sqlite:///...`` or ``http://...``). Sweep parent
runs (tag ``role=sweep``) are skipped; every other run is grouped by its settings

    method x threshold.cam_top_fraction x threshold.lime_mode x lime.num_samples

so reruns of the same settings pool their images. Per-image IoUs come from each run's
``results.csv`` artifact, or, when a run has none (killed before logging it), from its
``image_iou`` metric history. ``std_iou`` is the population standard deviation (ddof=0) of
the pooled per-image IoUs, as in each run's own ``std_iou`` metric.

Outputs, written to one folder: ``comparison.csv``, ``iou_vs_threshold.png`` and a
self-contained ``report.html``; with a parent run they are also logged to it under
``comparison/``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import matplotlib

matplotlib.use("Agg")
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from xai_exp.data import SUPPORTED_EXTENSIONS, safe_artifact_stem
from xai_exp.metrics import EXTRA_METRICS
from xai_exp.report import GalleryItem, render_html
from xai_exp.tracking import PARENT_TAG, RunLogger, fail_fast_http, temporary_env

SETTINGS = ("method", "cam_top_fraction", "lime_mode", "lime_samples")
STATUSES = ("ok", "flagged", "error")
TABLE_COLUMNS = (
    *SETTINGS,
    "runs",
    "unfinished_runs",
    "images",
    "compared",
    "mean_iou",
    "std_iou",
    "min_iou",
    "max_iou",
    "mean_cam_seconds",
    "mean_lime_seconds",
    *(f"n_{status}" for status in STATUSES),
    *(f"mean_{name}" for name in EXTRA_METRICS),
)
# per-image columns read from a run (results.csv or the metric histories)
IMAGE_COLUMNS = (
    "image",
    "artifact_stem",
    "status",
    "iou",
    "cam_seconds",
    "lime_seconds",
    "source",
    *EXTRA_METRICS,
)
CSV_NAME = "comparison.csv"
PLOT_NAME = "iou_vs_threshold.png"
HTML_NAME = "report.html"
ARTIFACT_DIR = "comparison"
GALLERY_SIZE = 3


class CompareError(RuntimeError):
    """The comparison cannot be made; the message is one line meant for the user."""


@dataclass
class Comparison:
    """The grouped table, the per-image rows behind it and the files written."""

    table: pd.DataFrame
    images: pd.DataFrame
    runs: list[Run]
    files: dict[str, Path] = field(default_factory=dict)


# --------------------------------------------------------------------------- store access


def _quiet_downloads() -> contextlib.AbstractContextManager[None]:
    """No per-file download progress bars on stderr."""
    return temporary_env({"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})


def redact_uri(uri: str) -> str:
    """The URI without a password (safe to print and to put in a report)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else "***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other URIs and in-memory ones)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def open_store(uri: str) -> MlflowClient:
    """A client for `uri`; a sqlite URI must name an existing file (never create an empty one)."""
    path = _sqlite_path(uri)
    if path is not None and not path.is_file():
        raise CompareError(
            f"tracking store {uri} not found: there is no file {path} "
            "(run a study first, or pass --tracking-uri)"
        )
    return MlflowClient(tracking_uri=uri)


def scrub(text: str, uri: str) -> str:
    """`text` with the URI's password masked (MLflow's errors quote the full request URL)."""
    password = urlsplit(uri).password
    return text.replace(f":{password}@", ":***@") if password else text


def _unreachable(uri: str, error: BaseException) -> CompareError:
    detail = scrub(_first_line(error), uri)
    return CompareError(
        f"tracking store {redact_uri(uri)} is unreachable "
        f"({type(error).__name__}: {detail}); start the server or pass --tracking-uri"
    )


def resolve_experiment(client: MlflowClient, uri: str, name: str) -> str:
    """Experiment id for `name`, or a CompareError naming the experiments that exist."""
    with fail_fast_http():
        try:
            found = client.get_experiment_by_name(name)
            if found is not None:
                return found.experiment_id
            names = [e.name for e in client.search_experiments(max_results=20)]
        except Exception as error:  # any store failure (MlflowException, OSError...): one line
            raise _unreachable(uri, error) from error
    known = ", ".join(repr(n) for n in names) or "none"
    raise CompareError(
        f"experiment {name!r} not found at {redact_uri(uri)} (experiments there: {known}); "
        "pass --experiment"
    )


def resolve_parent(client: MlflowClient, uri: str, run_id: str) -> Run:
    """The parent run, or a CompareError when it does not exist."""
    with fail_fast_http():
        try:
            return client.get_run(run_id)
        except MlflowException as error:
            if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise CompareError(
                    f"run {run_id} not found at {redact_uri(uri)}; pass a parent run id "
                    "(the sweep's mlflow_parent.json names it)"
                ) from error
            raise _unreachable(uri, error) from error
        except Exception as error:
            raise _unreachable(uri, error) from error


def is_sweep_parent(run: Run) -> bool:
    """True for the parent run the sweep callback creates (tag role=sweep)."""
    return run.data.tags.get("role") == "sweep"


def search_all_runs(
    client: MlflowClient, experiment_ids: Sequence[str], filter_string: str = ""
) -> list[Run]:
    """Every active run matching the filter, oldest first, across result pages."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            list(experiment_ids),
            filter_string=filter_string,
            max_results=1000,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def study_runs(
    client: MlflowClient, experiment_ids: Sequence[str], parent_run_id: str | None = None
) -> list[Run]:
    """The study runs of the experiments (or the children of one parent), parents skipped."""
    filter_string = f"tags.`{PARENT_TAG}` = '{parent_run_id}'" if parent_run_id else ""
    runs = search_all_runs(client, experiment_ids, filter_string)
    return [run for run in runs if not is_sweep_parent(run)]


# --------------------------------------------------------------------------- per-run data


def _to_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _to_int(value: Any) -> Any:
    try:
        return int(float(value))
    except (TypeError, ValueError, OverflowError):
        return pd.NA


def run_settings(run: Run) -> dict[str, Any]:
    """The grouping settings of a run, from its params (``method`` tag as a fallback)."""
    params = run.data.params
    return {
        "method": params.get("method.name") or run.data.tags.get("method") or "unknown",
        "cam_top_fraction": _to_float(params.get("threshold.cam_top_fraction")),
        "lime_mode": params.get("threshold.lime_mode") or "unknown",
        "lime_samples": _to_int(params.get("lime.num_samples")),
    }


def run_label(run: Run) -> str:
    """Run name, or the run id when it has none."""
    return run.info.run_name or run.data.tags.get("mlflow.runName") or run.info.run_id


def _column(frame: pd.DataFrame, name: str, default: Any) -> pd.Series:
    if name in frame.columns:
        return frame[name]
    return pd.Series([default] * len(frame), index=frame.index, dtype=object)


def _images_from_csv(path: Path) -> pd.DataFrame:
    """Per-image rows from a results.csv (strings kept as written: an image named NA stays NA)."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    return pd.DataFrame(
        {
            "image": _column(frame, "image", "").astype(str),
            "artifact_stem": _column(frame, "artifact_stem", "").astype(str),
            "status": _column(frame, "status", "ok").astype(str).replace("", "ok"),
            "iou": pd.to_numeric(_column(frame, "iou", None), errors="coerce"),
            "cam_seconds": pd.to_numeric(_column(frame, "cam_seconds", None), errors="coerce"),
            "lime_seconds": pd.to_numeric(_column(frame, "lime_seconds", None), errors="coerce"),
            "source": "results.csv",
            **{
                name: pd.to_numeric(_column(frame, name, None), errors="coerce")
                for name in EXTRA_METRICS
            },
        }
    )


def _images_from_history(client: MlflowClient, run: Run) -> pd.DataFrame:
    """Per-image rows rebuilt from the ``image_*`` metric histories (step = image index).

    A step with an IoU is ``ok``; a step with timings but no IoU is ``flagged`` (its IoU was
    None, which is not logged); failed images log nothing, so the run's ``n_failed`` metric
    adds that many ``error`` rows.
    """
    run_id = run.info.run_id

    def history(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run_id, key)}

    iou = history("image_iou")
    cam = history("image_cam_seconds")
    lime = history("image_lime_seconds")
    rows = [
        {
            "image": f"image #{step}",
            "artifact_stem": "",
            "status": "ok" if step in iou else "flagged",
            "iou": iou.get(step, math.nan),
            "cam_seconds": cam.get(step, math.nan),
            "lime_seconds": lime.get(step, math.nan),
            "source": "metric history",
        }
        for step in sorted(set(iou) | set(cam) | set(lime))
    ]
    failed = run.data.metrics.get("n_failed", 0.0)
    failed = int(failed) if math.isfinite(failed) else 0
    rows += [
        {
            "image": f"failed image {n + 1}",
            "artifact_stem": "",
            "status": "error",
            "iou": math.nan,
            "cam_seconds": math.nan,
            "lime_seconds": math.nan,
            "source": "metric history",
        }
        for n in range(failed)
    ]
    return pd.DataFrame(rows, columns=list(IMAGE_COLUMNS))


def run_images(client: MlflowClient, run: Run, workdir: Path) -> pd.DataFrame:
    """The per-image rows of one run, tagged with the run and its settings."""
    run_id = run.info.run_id
    names = {info.path for info in client.list_artifacts(run_id)}
    if "results.csv" in names:
        local = client.download_artifacts(run_id, "results.csv", str(workdir / run_id))
        frame = _images_from_csv(Path(local))
    else:
        frame = _images_from_history(client, run)
    for key, value in reversed(list(run_settings(run).items())):
        frame.insert(0, key, value)
    frame.insert(0, "run_status", run.info.status)
    frame.insert(0, "run_name", run_label(run))
    frame.insert(0, "run_id", run_id)
    return frame


def collect_images(client: MlflowClient, runs: Sequence[Run], workdir: Path) -> pd.DataFrame:
    """Per-image rows of all runs, one table with a fresh index."""
    frames = [run_images(client, run, workdir) for run in runs]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=["run_id", "run_name", "run_status", *SETTINGS, *IMAGE_COLUMNS])
    images = pd.concat(frames, ignore_index=True)
    images["iou"] = images["iou"].astype(float)
    images["lime_samples"] = images["lime_samples"].astype("Int64")
    return images


# --------------------------------------------------------------------------- grouping


def _mean(series: pd.Series) -> float:
    values = pd.to_numeric(series, errors="coerce").dropna()
    return float(values.mean()) if len(values) else math.nan


def summarize_groups(runs: Sequence[Run], images: pd.DataFrame) -> pd.DataFrame:
    """One row per settings group: run and image counts, IoU statistics, timings, statuses."""
    run_frame = pd.DataFrame(
        [{"run_id": r.info.run_id, "run_status": r.info.status, **run_settings(r)} for r in runs],
        columns=["run_id", "run_status", *SETTINGS],
    )
    run_frame["lime_samples"] = run_frame["lime_samples"].astype("Int64")
    rows = []
    for key, group in run_frame.groupby(list(SETTINGS), dropna=False, sort=False):
        part = images[images["run_id"].isin(set(group["run_id"]))]
        iou = part["iou"].dropna()
        row = dict(zip(SETTINGS, key, strict=True))
        row.update(
            runs=int(group["run_id"].nunique()),
            unfinished_runs=int((group["run_status"] != "FINISHED").sum()),
            images=len(part),
            compared=len(iou),
            mean_iou=float(iou.mean()) if len(iou) else math.nan,
            std_iou=float(iou.std(ddof=0)) if len(iou) else math.nan,
            min_iou=float(iou.min()) if len(iou) else math.nan,
            max_iou=float(iou.max()) if len(iou) else math.nan,
            mean_cam_seconds=_mean(part["cam_seconds"]),
            mean_lime_seconds=_mean(part["lime_seconds"]),
        )
        for status in STATUSES:
            row[f"n_{status}"] = int((part["status"] == status).sum())
        for name in EXTRA_METRICS:
            row[f"mean_{name}"] = _mean(part[name]) if name in part else math.nan
        rows.append(row)
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    unused = [f"mean_{name}" for name in EXTRA_METRICS if table[f"mean_{name}"].isna().all()]
    table = table.drop(columns=unused)  # only the metrics the runs computed
    table["lime_samples"] = table["lime_samples"].astype("Int64")
    order = ["method", "lime_mode", "lime_samples", "cam_top_fraction"]
    return table.sort_values(order, na_position="last", kind="mergesort").reset_index(drop=True)


def format_table(table: pd.DataFrame) -> str:
    """The table as fixed-width text for a terminal."""
    if table.empty:
        return "(no runs)"

    def fixed(digits: int):
        return lambda v: "-" if pd.isna(v) else f"{v:.{digits}f}"

    formatters = {
        "cam_top_fraction": lambda v: "-" if pd.isna(v) else f"{v:g}",
        "lime_samples": lambda v: "-" if pd.isna(v) else str(int(v)),
        "mean_iou": fixed(3),
        "std_iou": fixed(3),
        "min_iou": fixed(3),
        "max_iou": fixed(3),
        "mean_cam_seconds": fixed(3),
        "mean_lime_seconds": fixed(3),
        **{f"mean_{name}": fixed(3) for name in EXTRA_METRICS},
    }
    return table.to_string(index=False, formatters=formatters, na_rep="-")


# --------------------------------------------------------------------------- outputs


def plot_iou_vs_threshold(table: pd.DataFrame, path: Path) -> Path:
    """Mean IoU ± std against cam_top_fraction, one line per method x LIME samples x mode."""
    figure = Figure(figsize=(7.5, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    lines = 0
    groups = table.groupby(["method", "lime_samples", "lime_mode"], dropna=False, sort=True)
    for (method, samples, mode), part in groups:
        part = part.dropna(subset=["cam_top_fraction", "mean_iou"]).sort_values("cam_top_fraction")
        if part.empty:
            continue
        samples_text = "?" if pd.isna(samples) else str(int(samples))
        axes.errorbar(
            part["cam_top_fraction"],
            part["mean_iou"],
            yerr=part["std_iou"].fillna(0.0),
            marker="o",
            capsize=3,
            linestyle="--" if mode == "area_matched" else "-",
            label=f"{method}, {samples_text} LIME samples, {mode}",
        )
        lines += 1
    axes.set_xlabel("CAM top fraction (threshold.cam_top_fraction)")
    axes.set_ylabel("mean IoU (± std over images)")
    axes.set_title("CAM vs LIME agreement")
    axes.grid(alpha=0.3)
    if lines:
        axes.legend(fontsize="small")
    else:
        axes.text(0.5, 0.5, "no IoU to plot", ha="center", va="center", transform=axes.transAxes)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    return path


def _settings_text(row: Mapping[str, Any]) -> str:
    fraction = row["cam_top_fraction"]
    samples = row["lime_samples"]
    return (
        f"{row['method']}, top {'?' if pd.isna(fraction) else f'{fraction:g}'}, "
        f"{row['lime_mode']}, {'?' if pd.isna(samples) else int(samples)} LIME samples"
    )


def gallery_rows(images: pd.DataFrame, size: int = GALLERY_SIZE) -> list[tuple[str, pd.Series]]:
    """The `size` highest- and lowest-IoU images over all runs (never the same row twice)."""
    scored = images.dropna(subset=["iou"])
    keys = ["iou", "run_name", "image"]
    best = scored.sort_values(keys, ascending=[False, True, True], kind="mergesort").head(size)
    rest = scored.drop(index=best.index)
    worst = rest.sort_values(keys, ascending=[True, True, True], kind="mergesort").head(size)
    return [("best", row) for _, row in best.iterrows()] + [
        ("worst", row) for _, row in worst.iterrows()
    ]


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


def write_outputs(
    client: MlflowClient,
    comparison: Comparison,
    out_dir: Path,
    workdir: Path,
    title: str,
    meta: Sequence[str],
) -> dict[str, Path]:
    """comparison.csv, iou_vs_threshold.png and report.html in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / CSV_NAME
    comparison.table.to_csv(csv_path, index=False)
    plot_path = plot_iou_vs_threshold(comparison.table, out_dir / PLOT_NAME)
    overlays = _Overlays(client, workdir)
    gallery = [
        GalleryItem(
            kind=kind,
            run_id=row["run_id"],
            run_name=row["run_name"],
            image=str(row["image"]),
            iou=float(row["iou"]),
            settings=_settings_text(row),
            png=overlays.png(row),
        )
        for kind, row in gallery_rows(comparison.images)
    ]
    html_path = out_dir / HTML_NAME
    page = render_html(title, meta, comparison.table, plot_path.read_bytes(), gallery)
    html_path.write_text(page, encoding="utf-8")
    comparison.files = {"csv": csv_path, "plot": plot_path, "html": html_path}
    return comparison.files


def build_comparison(
    client: MlflowClient,
    runs: Sequence[Run],
    out_dir: Path,
    title: str,
    meta: Sequence[str] = (),
) -> Comparison:
    """Read the runs' per-image results, group them and write the three files."""
    runs = [r for r in runs if not is_sweep_parent(r)]
    if not runs:
        raise CompareError("no study runs to compare")
    with tempfile.TemporaryDirectory(prefix="xai-exp-compare-") as tmp, _quiet_downloads():
        workdir = Path(tmp)
        images = collect_images(client, runs, workdir)
        comparison = Comparison(summarize_groups(runs, images), images, list(runs))
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        full_meta = [
            *meta,
            f"{len(runs)} runs, {len(images)} image results, generated {stamp}",
            "std_iou: population std (ddof=0) of the per-image IoUs pooled over a group's runs",
        ]
        write_outputs(client, comparison, out_dir, workdir, title, full_meta)
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
        parent = resolve_parent(client, tracking_uri, parent_run_id)
        experiment_ids = [parent.info.experiment_id]
        scope = f"children of run {parent_run_id} ({run_label(parent)})"
    else:
        experiment_ids = [resolve_experiment(client, tracking_uri, experiment)]
        scope = f"experiment {experiment!r}"
    runs = study_runs(client, experiment_ids, parent.info.run_id if parent else None)
    if not runs:
        raise CompareError(f"no study runs to compare in {scope} at {redact_uri(tracking_uri)}")
    title = f"xai-exp comparison: {scope}"
    meta = [f"tracking URI: {redact_uri(tracking_uri)}"]
    comparison = build_comparison(client, runs, Path(out_dir), title, meta)
    if parent is not None:
        log_files(client, parent.info.run_id, comparison.files)
    return comparison


def log_comparison_to_parent(
    parent: RunLogger, children: list[Run], sweep_dir: Path | None
) -> Comparison:
    """Sweep callback hook: compare the children and log the files to the parent run.

    The files go to ``<sweep_dir>/comparison/`` (kept next to the sweep's job folders), or to
    a temporary folder when there is no sweep dir.
    """
    client = parent.client
    title = f"xai-exp comparison: sweep run {parent.run_id}"
    meta = [f"sweep dir: {sweep_dir}"] if sweep_dir else []
    if sweep_dir is not None:
        comparison = build_comparison(client, children, Path(sweep_dir) / ARTIFACT_DIR, title, meta)
        log_files(client, parent.run_id, comparison.files)
        return comparison
    with tempfile.TemporaryDirectory(prefix="xai-exp-comparison-") as tmp:
        comparison = build_comparison(client, children, Path(tmp), title, meta)
        log_files(client, parent.run_id, comparison.files)
    return comparison
