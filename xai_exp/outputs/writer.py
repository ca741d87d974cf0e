"""A run's local files: results.csv row by row, overlays, charts, summary and parameter files.

Everything lands in the run's output folder first; the job uploads what it wants to MLflow.
No MLflow and no Hydra here.
"""

from __future__ import annotations

import csv
import dataclasses
import heapq
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from xai_exp.cache import ExplanationCache
from xai_exp.config import PlotsConfig, StudyConfig
from xai_exp.data.images import SkippedFile
from xai_exp.evaluate.results import ImageResult, Status, csv_columns
from xai_exp.files import atomic_path, atomic_write_text
from xai_exp.models.facts import ModelFacts
from xai_exp.models.threads import inference_threads
from xai_exp.outputs import plots

if TYPE_CHECKING:
    from xai_exp.evaluate.faithfulness import FaithfulnessCurves

RESULTS_CSV = "results.csv"
KEYS_CSV = "explanation_keys.csv"  # per image the cache keys of its maps (for `compare`)
KEY_COLUMNS = ("image", "cam", "segments", "reference")  # before #20: `lime` for `reference`
OVERLAYS = "overlays"  # the folder of per-image overlay figures
FIGURE_KIND = "figures"  # cache folder of rendered overlays
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")

ImageHook = Callable[[int, ImageResult], None]
T = TypeVar("T")
log = logging.getLogger("xai_exp")


def _quoted(value: Any) -> bool:
    """A cell that `inert_cell` quotes: it starts like a formula, after any quotes."""
    if not isinstance(value, str) or not value.lstrip("'").startswith(FORMULA_START):
        return False
    try:
        float(value)  # a number (-0.5, +1e-3) is no formula: it stays a number
    except ValueError:
        return True
    return False


def inert_cell(value: Any) -> Any:
    """A text cell a spreadsheet shows as text: one starting like a formula (``= + - @``, tab,
    CR) gets a leading quote. The one sanitiser of every CSV xai-exp writes (results.csv and
    its ``artifact_stem``, compare's CSVs); `plain_cell` reads it back."""
    return "'" + value if _quoted(value) else value


def plain_cell(value: Any) -> Any:
    """The value `inert_cell` was given (a quoted formula-like cell without its quote)."""
    return value[1:] if _quoted(value) and value.startswith("'") else value


def inert_frame(frame: Any) -> Any:
    """A pandas DataFrame with `inert_cell` applied to every cell, index and column label."""
    out = frame.map(inert_cell)
    out.index = out.index.map(inert_cell)
    out.columns = out.columns.map(inert_cell)
    return out


class OverlayPlan:
    """Which images get an overlay file, decided while the images stream past.

    With `cap` None (all) or at most `cap` images, every one. Past the cap: a third of it for
    the highest IoUs, a third for the lowest, the rest a fixed random sample of image indices
    (seeded). An extreme is drawn when it enters the running top or bottom and its file is
    deleted when it drops out, so neither memory nor disk grows with the number of images.
    """

    def __init__(self, cap: int | None, total: int, seed: int = 0) -> None:
        self.every = cap is None or total <= cap
        self.none = cap == 0
        self.side = 0 if self.every or cap is None else cap // 3
        sample = 0 if self.every or cap is None else cap - 2 * self.side
        rng = np.random.default_rng(seed)
        chosen = rng.choice(total, size=min(sample, total), replace=False) if sample else ()
        self.sampled = {int(index) for index in chosen}
        self.highest: list[tuple[float, int, Path]] = []  # min-heaps: the worst kept on top
        self.lowest: list[tuple[float, int, Path]] = []
        self.holders: dict[Path, int] = {}

    def offer(self, index: int, iou: float | None, draw: Callable[[], Path]) -> None:
        """Draw the image's overlay (`draw`) when the plan keeps it, and drop what falls out."""
        if self.none:
            return
        kept = int(self.every or index in self.sampled)
        entering = []
        if iou is not None and self.side:
            for heap, key in ((self.highest, iou), (self.lowest, -iou)):
                if len(heap) < self.side or key > heap[0][0]:
                    entering.append((heap, key))
        if not kept and not entering:
            return
        path = draw()
        self.holders[path] = kept + len(entering)
        for heap, key in entering:
            if len(heap) < self.side:
                heapq.heappush(heap, (key, -index, path))
            else:
                self._release(heapq.heapreplace(heap, (key, -index, path))[2])

    def _release(self, path: Path) -> None:
        self.holders[path] -= 1
        if self.holders[path] == 0:
            del self.holders[path]
            path.unlink(missing_ok=True)


class ResultsWriter:
    """Writes each image's CSV row, and its overlay when the `OverlayPlan` keeps it.

    `on_image(index, result)` is called after the files are written. Arrays are dropped
    afterwards, so memory stays flat.
    """

    def __init__(
        self,
        out_dir: Path,
        method: str,
        on_image: ImageHook | None = None,
        setting: str = "",
        plots: PlotsConfig | None = None,
        overlays: OverlayPlan | None = None,
        figures: ExplanationCache | None = None,
        random_weights: bool = False,
    ) -> None:
        self.out_dir = out_dir
        self.figures = figures  # rendered overlays by fingerprint: a rerun copies, not draws
        self.method = method
        self.random_weights = random_weights  # a random-init model: its figures say so
        self.on_image = on_image
        self.setting = setting or method
        self.plots = plots or PlotsConfig()
        self.overlays = overlays or OverlayPlan(None, 0)
        self.csv_path = out_dir / RESULTS_CSV
        self.results: list[ImageResult] = []
        self.curves: dict[str, list[FaithfulnessCurves]] = {}  # per map source, for the plot
        self.columns = csv_columns()
        # what could not be written (a full disk, a read-only folder): path -> what of it
        self.unwritten: dict[Path, list[str]] = {}
        self.keys_path = out_dir / KEYS_CSV
        self.attempt(self.csv_path, "header", lambda: self._write_row(self.csv_path, None, "w"))
        self.attempt(self.keys_path, "header", lambda: self._write_row(self.keys_path, None, "w"))

    def attempt(self, path: Path, what: str, action: Callable[[], T]) -> T | None:
        """`action()`, or None when it fails with an OSError: the first such failure is one
        warning, each is remembered (`unwritten`, `unwritten_line`) and the study goes on."""
        if path in self.unwritten and path.suffix == ".csv":  # a CSV missing rows stays so
            self.unwritten[path].append(what)
            return None
        try:
            return action()
        except OSError as error:
            if not self.unwritten:
                log.warning(
                    "cannot write %s (%s); the study goes on: its results stay in memory and "
                    "go to MLflow, and the end of the run lists what is missing here",
                    path,
                    error.strerror or error,
                )
            self.unwritten.setdefault(path, []).append(what)
            return None

    def written(self, path: Path) -> bool:
        """Whether `path` was written whole."""
        return path not in self.unwritten

    def unwritten_line(self) -> str | None:
        """One line naming what could not be written, or None."""
        if not self.unwritten:
            return None
        parts = []
        for path, what in self.unwritten.items():
            name = path.relative_to(self.out_dir) if path.is_relative_to(self.out_dir) else path
            rows = sum(1 for w in what if w.startswith("row"))
            parts.append(f"{name} ({rows} rows missing)" if rows else str(name))
        shown = ", ".join(parts[:5]) + (f" and {len(parts) - 5} more" if len(parts) > 5 else "")
        return f"could not write {len(parts)} file(s) in {self.out_dir}: {shown}"

    def _write_row(self, path: Path, row: Sequence[Any] | dict[str, Any] | None, mode: str) -> None:
        with path.open(mode, newline="", encoding="utf-8") as file:
            if path != self.csv_path:
                csv.writer(file).writerow(KEY_COLUMNS if row is None else row)
            elif isinstance(row, dict):
                csv.DictWriter(file, fieldnames=self.columns).writerow(row)
            else:
                csv.DictWriter(file, fieldnames=self.columns).writeheader()

    def __call__(self, index: int, result: ImageResult) -> None:
        self.results.append(result)
        row = {key: inert_cell(value) for key, value in result.row().items()}
        what = f"row of {result.name}"
        self.attempt(self.csv_path, what, lambda: self._write_row(self.csv_path, row, "a"))
        if result.cache_keys:
            keys = [result.cache_keys.get(kind, "") for kind in KEY_COLUMNS[1:]]
            line = [inert_cell(result.name), *keys]
            self.attempt(self.keys_path, what, lambda: self._write_row(self.keys_path, line, "a"))
        if result.status != Status.ERROR:
            overlay = self.figure_path(f"{OVERLAYS}/{result.artifact_stem}")
            self.attempt(
                overlay,
                "overlay",
                lambda: self.overlays.offer(index, result.iou, lambda: self._draw(result)),
            )
        for source, curves in result.arrays.get("faithfulness", {}).items():
            self.curves.setdefault(source, []).append(curves)
        if self.on_image is not None:
            self.on_image(index, result)
        result.arrays.clear()

    def _draw(self, result: ImageResult) -> Path:
        path = self.figure_path(f"{OVERLAYS}/{result.artifact_stem}")
        key = None
        if self.figures is not None and self.figures.enabled:
            key = plots.overlay_fingerprint(
                result, self.method, self.plots.dpi, path.suffix, self.random_weights
            )
            entry = self.figures.load(FIGURE_KIND, key)
            if entry is not None and "drawing" in entry.arrays:
                with atomic_path(path, suffix=path.suffix) as temp:
                    temp.write_bytes(entry.arrays["drawing"].tobytes())
                return path
        figure = plots.overlay_figure(result, self.method, self.random_weights)
        plots.save_figure(figure, path, self.plots.dpi)
        if key is not None and self.figures is not None:
            drawn = np.frombuffer(path.read_bytes(), dtype=np.uint8)
            self.figures.store(FIGURE_KIND, key, {"drawing": drawn}, {"kind": FIGURE_KIND})
        return path

    def figure_path(self, name: str) -> Path:
        """Where a figure of this run goes, in the configured format."""
        return self.out_dir / f"{name}.{self.plots.format}"


def explanation_params(
    cfg: StudyConfig, model: ModelFacts, versions: dict[str, str]
) -> dict[str, Any]:
    """What determines the explanations, as JSON (never pickled)."""
    return {
        "model": {
            "arch": model.arch,
            "identity": model.identity,
            "family": model.family,
            "target_layer": model.target_layer_name,
            "preprocess": cfg.model.preprocess,
            **model.preprocessing(),
        },
        "method": dataclasses.asdict(cfg.method),
        "lime": dataclasses.asdict(cfg.lime),
        "threshold": dataclasses.asdict(cfg.threshold),
        "precision": cfg.precision,
        "device": model.device,
        "inference_engine": model.engine,
        "inference_threads": inference_threads(cfg.inference.threads).threads,
        "versions": versions,
    }


def write_run_files(
    writer: ResultsWriter,
    params: dict[str, Any],
    summary: dict[str, float],
    skipped: Sequence[SkippedFile],
) -> list[Path]:
    """The run's files beside results.csv: charts, parameters, summary, skipped files.

    Returns every file of the run (results.csv first), for upload.
    """
    out_dir, method, dpi = writer.out_dir, writer.method, writer.plots.dpi
    files = [path for path in (writer.csv_path, writer.keys_path) if writer.written(path)]

    def keep(path: Path, write: Callable[[], Path]) -> None:
        if writer.attempt(path, "file", write) is not None:
            files.append(path)

    chart = plots.iou_bar_chart(writer.results, writer.setting, writer.random_weights)
    bars = writer.figure_path("iou_bar_chart")
    keep(bars, lambda: plots.save_figure(chart, bars, dpi))
    if writer.curves:
        reference = writer.results[0].reference if writer.results else "reference"
        labels = {"cam": method, "reference": reference}
        curves = {labels[source]: found for source, found in writer.curves.items()}
        curve_path = writer.figure_path("faithfulness_curves")
        keep(curve_path, lambda: plots.save_figure(plots.curve_plot(curves), curve_path, dpi))
    params_path = out_dir / "explanation_params.json"
    keep(params_path, lambda: atomic_write_text(params_path, json.dumps(params, indent=2)))
    finite = {
        k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()
    }
    summary_path = out_dir / "summary.json"
    keep(summary_path, lambda: atomic_write_text(summary_path, json.dumps(finite, indent=2)))
    if skipped:
        path = out_dir / "skipped_files.csv"

        def write_skipped() -> Path:
            with path.open("w", newline="", encoding="utf-8") as file:
                rows = csv.writer(file)
                rows.writerow(["path", "reason"])
                rows.writerows([(inert_cell(s.path), inert_cell(s.reason)) for s in skipped])
            return path

        keep(path, write_skipped)
    return files
