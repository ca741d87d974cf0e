"""Figures: per-image overlays, the IoU bar chart, faithfulness curves, IoU vs threshold.

Every figure is a bare matplotlib `Figure` on an Agg canvas (no pyplot state, no display), made
with `new_figure` and written with `save_figure`.
"""

from __future__ import annotations

import functools
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from xai_exp.evaluate.overlap import chance_corrected, iou
from xai_exp.evaluate.results import ImageResult
from xai_exp.files import atomic_path

if TYPE_CHECKING:
    import pandas as pd

    from xai_exp.evaluate.faithfulness import FaithfulnessCurves

DPI = 100
# The agreement panel: what IoU measures, in three colours that stay apart for colour-blind eyes.
CAM_ONLY = (0.90, 0.60, 0.00)  # orange
LIME_ONLY = (0.00, 0.45, 0.70)  # blue
BOTH = (0.80, 0.47, 0.65)  # reddish purple


def new_figure(width: float, height: float) -> Figure:
    """A figure with an Agg canvas and constrained layout."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: Path, dpi: int = DPI) -> Path:
    """Save atomically (temp file, then rename) in the format of the path's suffix."""
    with atomic_path(path, suffix=path.suffix) as temp:
        figure.savefig(temp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or None)
    return path


def plain_text(text: str) -> str:
    """Text matplotlib shows as typed: ``$`` would start mathtext markup."""
    return text.replace("$", r"\$")


RANDOM_MARK = " (random weights)"  # in the titles of a random-init model's figures


def _mean_label(result: ImageResult) -> str:
    """What `result.iou` is: one seed's IoU, or the mean over several LIME seeds."""
    seeds = result.lime_seeds
    if len(seeds) > 1:
        return f"mean IoU over LIME seeds {', '.join(map(str, seeds))}:"
    return "IoU"


def _title(result: ImageResult, method: str, random_weights: bool = False) -> str:
    label = _mean_label(result)
    score = f"{label} n/a" if result.iou is None else f"{label} {result.iou:.3f}"
    head = (
        f"{result.name}: {result.predicted_label} ({result.probability:.0%})  "
        f"{method} vs {result.reference}"
    )
    tail = f"  {score}" + (f"  [{result.reason}]" if result.reason else "")
    return plain_text(head + tail + (RANDOM_MARK if random_weights else ""))


def agreement_image(image: np.ndarray, cam_mask: np.ndarray, lime_mask: np.ndarray) -> np.ndarray:
    """The image, dimmed, with CAM-only, LIME-only and shared pixels in three colours."""
    shown = image.astype(np.float32) / 255.0 * 0.45 + 0.3
    for mask, colour in (
        (cam_mask & ~lime_mask, CAM_ONLY),
        (lime_mask & ~cam_mask, LIME_ONLY),
        (cam_mask & lime_mask, BOTH),
    ):
        shown[mask] = 0.25 * shown[mask] + 0.75 * np.array(colour)
    return np.clip(shown, 0.0, 1.0)


def agreement_title(result: ImageResult) -> str:
    """The agreement panel's title: the IoU of the masks it draws (one LIME seed's, named when
    there are several), then the mean over seeds, labelled as such, and each seed's IoU."""
    cam_mask, lime_mask = result.arrays.get("cam_mask"), result.arrays.get("lime_mask")
    seeds = result.lime_seeds
    if cam_mask is None or lime_mask is None:
        drawn = "no masks to draw"
    else:
        drawn = f"IoU {iou(cam_mask, lime_mask):.3f}"
    versus = f"CAM mask vs {result.reference} mask"
    if len(seeds) <= 1:
        return "masks" if cam_mask is None or lime_mask is None else f"{versus}: {drawn}"
    mean = "n/a" if result.iou is None else f"{result.iou:.3f}"
    each = " / ".join("n/a" if v is None else f"{v:.3f}" for v in result.iou_per_seed)
    return (
        f"{versus} (seed {seeds[0]} drawn): {drawn}\n"
        f"mean over seeds {', '.join(map(str, seeds))}: {mean} ({each})"
    )


OVERLAY_ARRAYS = (
    "image",
    "cam",
    "segments",
    "lime_weights",
    "reference_map",
    "cam_mask",
    "lime_mask",
)
OVERLAY_FIELDS = (  # every ImageResult field `overlay_figure` draws: keep in step with it
    "name",
    "predicted_label",
    "predicted_class",
    "probability",
    "true_label",
    "true_class",
    "target_label",
    "iou",
    "iou_by_seed",
    "lime_seeds",
    "reference",
    "reason",
)


@functools.cache
def _plotting_code() -> bytes:
    """This module's source, read once: a change to the drawing code draws figures again."""
    return Path(__file__).read_bytes()


def overlay_fingerprint(
    result: ImageResult, method: str, dpi: int, suffix: str, random_weights: bool = False
) -> str:
    """What `overlay_figure` draws from, with this module's code and matplotlib's version:
    one fingerprint, one file (a rerun copies the file instead of drawing it again)."""
    import hashlib

    import matplotlib

    digest = hashlib.sha256(_plotting_code())
    fields = {name: getattr(result, name) for name in OVERLAY_FIELDS}
    drawn = (fields, method, dpi, suffix, random_weights, matplotlib.__version__)
    digest.update(repr(drawn).encode())
    for name in OVERLAY_ARRAYS:
        array = result.arrays.get(name)
        digest.update(f"|{name}|".encode())
        if array is not None:
            array = np.ascontiguousarray(array)
            digest.update(f"{array.dtype.str}{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def overlay_figure(result: ImageResult, method: str, random_weights: bool = False) -> Figure:
    """Image, CAM map, the reference's weights or map (each with a colorbar) and where the
    two masks agree.

    A random-init model's figure says so next to its prediction and in the title.
    """
    from matplotlib.patches import Patch
    from skimage.segmentation import mark_boundaries

    arrays = result.arrays
    image = arrays["image"]
    figure = new_figure(16, 4.4)
    axes = figure.subplots(1, 4)
    axes[0].imshow(image)
    title = f"predicted: {result.predicted_label} ({result.probability:.0%})"
    title += "\nmodel: random weights" if random_weights else ""
    if result.true_label:
        verdict = (
            ""
            if result.true_class is None
            else (" (right)" if result.true_class == result.predicted_class else " (wrong)")
        )
        title += f"\ntrue: {result.true_label}{verdict}"
    axes[0].set_title(plain_text(title))
    axes[1].imshow(image)
    if "cam" in arrays:
        shown = axes[1].imshow(arrays["cam"], cmap="jet", alpha=0.5, vmin=0, vmax=1)
        figure.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.02, label="CAM (scaled 0..1)")
    axes[1].set_title(plain_text(f"{method} for {result.target_label}"))
    if "segments" in arrays:
        weights = arrays["lime_weights"][arrays["segments"]]
        limit = float(np.abs(weights).max()) or 1.0
        axes[2].imshow(mark_boundaries(image, arrays["segments"], color=(1, 1, 0)))
        shown = axes[2].imshow(weights, cmap="RdBu_r", alpha=0.55, vmin=-limit, vmax=limit)
        bar = figure.colorbar(shown, ax=axes[2], fraction=0.046, pad=0.02)
        bar.set_label(f"{result.reference} weight: red for, blue against the class")
    elif "reference_map" in arrays:
        values = arrays["reference_map"]
        low, high = float(values.min()), float(values.max())
        axes[2].imshow(image)
        if low >= 0:  # one sign (RISE, a CAM): its own range, as the CAM panel shows a CAM
            shown = axes[2].imshow(values, cmap="jet", alpha=0.5, vmin=low, vmax=max(high, low))
            label = f"{result.reference} (higher: more important)"
        else:  # signed attributions: white at zero; a few extreme pixels (Integrated
            # Gradients) would wash out the rest, so the scale stops at the 99th percentile
            limit = float(np.percentile(np.abs(values), 99)) or max(abs(low), abs(high)) or 1.0
            shown = axes[2].imshow(values, cmap="RdBu_r", alpha=0.55, vmin=-limit, vmax=limit)
            label = f"{result.reference}: red for, blue against\n(scale: 99th pct. of |value|)"
        bar = figure.colorbar(shown, ax=axes[2], fraction=0.046, pad=0.02)
        bar.set_label(label)
    seed = f" (seed {result.lime_seeds[0]})" if len(result.lime_seeds) > 1 else ""
    kind = "superpixel weights" if "segments" in arrays else "map"
    axes[2].set_title(plain_text(f"{result.reference} {kind}{seed}"))
    cam_mask, lime_mask = arrays.get("cam_mask"), arrays.get("lime_mask")
    if cam_mask is None or lime_mask is None:
        missing = "no IoU: flagged" if result.iou is None else "no mask for this seed"
        axes[3].text(0.5, 0.5, f"{missing}\n(see the reason above)", ha="center", va="center")
        axes[3].set_title(agreement_title(result))
    else:
        axes[3].imshow(agreement_image(image, cam_mask, lime_mask))
        pixels = cam_mask.size
        legend = [
            Patch(color=CAM_ONLY, label=f"CAM only ({(cam_mask & ~lime_mask).sum() / pixels:.0%})"),
            Patch(
                color=LIME_ONLY,
                label=f"{result.reference} only ({(lime_mask & ~cam_mask).sum() / pixels:.0%})",
            ),
            Patch(color=BOTH, label=f"both ({(cam_mask & lime_mask).sum() / pixels:.0%})"),
        ]
        drawn = chance_corrected(cam_mask, lime_mask)
        above = drawn["iou_corrected"]
        chance = f"random masks of these sizes: IoU {drawn['iou_chance']:.3f}; above chance " + (
            "n/a" if above is None else f"{above:+.2f}"
        )
        axes[3].legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3,
                       fontsize="small", frameon=False, handlelength=1, title=chance,
                       title_fontsize="small")  # fmt: skip
        axes[3].set_title(agreement_title(result))
    for axis in axes:
        axis.axis("off")
    figure.suptitle(_title(result, method, random_weights), fontsize=11)
    return figure


BAR_CHART_MAX = 40  # more images than this: a sorted IoU profile without per-image labels


def _value(result: ImageResult, name: str) -> float:
    """A registered metric's value for the image, NaN when it has none."""
    value = result.values.get(name)
    return math.nan if value is None else float(value)


def iou_bar_chart(
    results: Sequence[ImageResult], setting: str, random_weights: bool = False
) -> Figure:
    """IoU per image, highest first, with the mean as a line and each image's chance level (the
    IoU of random masks of its two sizes) as a tick; flagged or failed images last.

    Past `BAR_CHART_MAX` images the bars become a sorted profile (x: image rank) whose names
    are in results.csv: a figure stays readable, and its size bounded, at any image count.
    """
    ordered = sorted(results, key=lambda r: -r.iou if r.iou is not None else math.inf)
    names = [plain_text(r.name) for r in ordered]
    values = [r.iou if r.iou is not None else math.nan for r in ordered]
    many = len(names) > BAR_CHART_MAX
    figure = new_figure(10 if many else max(6, 0.9 * len(names) + 2), 4)
    axis = figure.add_subplot()
    if many:
        finite_count = sum(not math.isnan(v) for v in values)
        axis.fill_between(range(finite_count), values[:finite_count], color="tab:blue", step="mid")
        axis.set_xlim(0, max(1, len(values) - 1))
        axis.set_xlabel(
            f"{len(values)} images by IoU rank ({len(values) - finite_count} without IoU last; "
            "names in results.csv)"
        )
    else:
        axis.bar(range(len(names)), np.nan_to_num(values, nan=0.0), color="tab:blue")
        for index, value in enumerate(values):
            axis.text(
                index,
                (0 if math.isnan(value) else value) + 0.01,
                "n/a" if math.isnan(value) else f"{value:.2f}",
                ha="center",
                fontsize=8,
            )
        axis.set_xticks(range(len(names)), names, rotation=30, ha="right")
    chances = [_value(r, "iou_chance") for r in ordered]
    if any(not math.isnan(c) for c in chances):
        label = "chance (random masks of the same sizes)"
        if many:
            axis.plot(range(len(chances)), chances, color="0.2", linewidth=1, label=label)
        else:
            axis.scatter(range(len(chances)), chances, marker="_", s=400, color="0.2", label=label)
    finite = [v for v in values if not math.isnan(v)]
    if finite:
        mean = float(np.mean(finite))
        axis.axhline(mean, color="tab:red", linestyle="--", label=f"mean {mean:.3f}")
    if finite or any(not math.isnan(c) for c in chances):
        axis.legend(loc="upper right")
    axis.set_ylim(0, 1.05)
    reference = results[0].reference if results else "LIME"
    axis.set_ylabel(f"IoU (CAM mask vs {reference} mask)")
    mark = RANDOM_MARK if random_weights else ""
    axis.set_title(plain_text(f"IoU per image: {setting}{mark}"), fontsize=10)
    return figure


def _mean_curve(curves: Sequence[FaithfulnessCurves], kind: str) -> tuple[np.ndarray, Any]:
    """Mean of one kind of curve over images, on the first curve's fraction grid."""
    grid = curves[0].fractions
    stacked = [np.interp(grid, c.fractions, getattr(c, kind)) for c in curves]
    return grid, np.mean(stacked, axis=0)


def curve_plot(
    curves_by_method: Mapping[str, FaithfulnessCurves | Sequence[FaithfulnessCurves]],
) -> Figure:
    """Mean deletion (left) and insertion (right) curves per method, AUC in the legend."""
    figure = new_figure(10, 4)
    axes = figure.subplots(1, 2, sharey=True)
    for method, value in curves_by_method.items():
        curves = list(value) if isinstance(value, Sequence) else [value]
        if not curves:
            continue
        for ax, kind in zip(axes, ("deletion", "insertion"), strict=True):
            grid, mean = _mean_curve(curves, kind)
            auc = float(np.mean([getattr(c, f"{kind}_auc") for c in curves]))
            ax.plot(grid, mean, label=plain_text(f"{method} (AUC {auc:.3f}, n={len(curves)})"))
    for ax, kind in zip(
        axes, ("Deletion (lower is better)", "Insertion (higher is better)"), strict=True
    ):
        ax.set_title(kind)
        ax.set_xlabel("fraction of pixels")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    axes[0].set_ylabel("target-class probability")
    return figure


def _error_bars(part: pd.DataFrame, metric: str) -> Any:
    """The 95% interval of `metric` as error bar lengths (std without interval columns)."""
    if f"{metric}_ci_low" in part:
        below = (part[metric] - part[f"{metric}_ci_low"]).fillna(0.0).clip(lower=0)
        above = (part[f"{metric}_ci_high"] - part[metric]).fillna(0.0).clip(lower=0)
        return [below.to_numpy(), above.to_numpy()]
    return part["std_iou"].fillna(0.0) if metric == "mean_iou" else None


def iou_vs_threshold(table: pd.DataFrame, settings: Sequence[str]) -> Figure:
    """Mean IoU against cam_top_fraction over the chance level of its mask sizes (a band),
    and beside it the agreement above chance; one line per combination of the other settings,
    each mean with its 95% bootstrap interval (std when a table has no interval columns)."""
    corrected = "mean_iou_corrected" in table and table["mean_iou_corrected"].notna().any()
    figure = new_figure(12.0 if corrected else 7.5, 4.5)
    raw_axes = figure.add_subplot(1, 2 if corrected else 1, 1)
    above_axes = figure.add_subplot(1, 2, 2) if corrected else None
    lines = 0
    others = [key for key in settings if key != "cam_top_fraction"]
    groups = table.groupby(others, dropna=False, sort=True) if others else [((), table)]
    for values, part in groups:
        part = part.dropna(subset=["cam_top_fraction", "mean_iou"]).sort_values("cam_top_fraction")
        if part.empty:
            continue
        values = values if isinstance(values, tuple) else (values,)
        named = ", ".join(
            f"{k}={v}"
            for k, v in zip(others, values, strict=True)
            if not (isinstance(v, float) and math.isnan(v))  # a setting this run does not have
        )
        style: dict[str, Any] = {"marker": "o", "capsize": 3}
        style["linestyle"] = "--" if "area_matched" in values else "-"
        drawn = raw_axes.errorbar(
            part["cam_top_fraction"],
            part["mean_iou"],
            yerr=_error_bars(part, "mean_iou"),
            label=textwrap.fill(plain_text(named or "all runs"), 90),
            **style,
        )
        colour = drawn.lines[0].get_color()
        if "mean_iou_chance" in part and part["mean_iou_chance"].notna().any():
            raw_axes.fill_between(
                part["cam_top_fraction"],
                0,
                part["mean_iou_chance"].fillna(0.0),
                color=colour,
                alpha=0.15,
                linewidth=0,
            )
        for x, y, n in zip(
            part["cam_top_fraction"], part["mean_iou"], part["compared"], strict=True
        ):
            raw_axes.annotate(
                f"n={n}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7
            )
        if above_axes is not None:
            above_axes.errorbar(
                part["cam_top_fraction"],
                part["mean_iou_corrected"],
                yerr=_error_bars(part, "mean_iou_corrected"),
                color=colour,
                **style,
            )
        lines += 1
    raw_axes.set_xlabel("CAM top fraction (threshold.cam_top_fraction)")
    raw_axes.set_ylabel("mean IoU (95% bootstrap CI over images)")
    raw_axes.set_ylim(bottom=0)
    raw_axes.set_title("raw IoU; shaded: chance (random masks, same sizes)", fontsize="medium")
    raw_axes.grid(alpha=0.3)
    if above_axes is not None:
        above_axes.axhline(0, color="0.4", linewidth=1, linestyle=":")
        above_axes.set_xlabel("CAM top fraction (threshold.cam_top_fraction)")
        above_axes.set_ylabel("(IoU - chance) / (ceiling - chance)")
        above_axes.set_title("agreement above chance (0 = chance)", fontsize="medium")
        above_axes.grid(alpha=0.3)
    figure.suptitle("CAM vs reference agreement")
    if lines:
        # below the axes: with several compared settings the labels are long
        figure.legend(loc="outside lower center", fontsize="small")
    else:
        raw_axes.text(
            0.5, 0.5, "no IoU to plot", ha="center", va="center", transform=raw_axes.transAxes
        )
    return figure
