"""Figures: per-image overlays, the IoU bar chart, faithfulness curves, IoU vs threshold.

Every figure is a bare matplotlib `Figure` on an Agg canvas (no pyplot state, no display), made
with `new_figure` and written with `save_figure`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from skimage.segmentation import mark_boundaries

from xai_exp.files import atomic_path
from xai_exp.results import ImageResult

if TYPE_CHECKING:
    import pandas as pd

    from xai_exp.faithfulness import FaithfulnessCurves

DPI = 100


def new_figure(width: float, height: float) -> Figure:
    """A figure with an Agg canvas and constrained layout."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: Path) -> Path:
    """Save as PNG atomically (temp file, then rename), so no half-written file is ever seen."""
    with atomic_path(path, suffix=path.suffix) as temp:
        figure.savefig(temp, dpi=DPI, bbox_inches="tight")
    return path


def plain_text(text: str) -> str:
    """Text matplotlib shows as typed: ``$`` would start mathtext markup."""
    return text.replace("$", r"\$")


def _title(result: ImageResult, method: str) -> str:
    score = "IoU n/a" if result.iou is None else f"IoU {result.iou:.3f}"
    head = f"{result.name}: {result.predicted_label} ({result.probability:.0%})  {method} vs LIME"
    tail = f"  {score}" + (f"  [{result.reason}]" if result.reason else "")
    return plain_text(head + tail)


def overlay_figure(result: ImageResult, method: str) -> Figure:
    """Original, CAM overlay, LIME overlay, CAM mask and LIME mask, side by side."""
    arrays = result.arrays
    image = arrays["image"]
    figure = new_figure(17, 4)
    axes = figure.subplots(1, 5)
    axes[0].imshow(image)
    axes[0].set_title("image")
    axes[1].imshow(image)
    if "cam" in arrays:
        axes[1].imshow(arrays["cam"], cmap="jet", alpha=0.5, vmin=0, vmax=1)
    axes[1].set_title(plain_text(f"{method} ({result.target_label})"))
    if "segments" in arrays:
        weights = arrays["lime_weights"][arrays["segments"]]
        limit = float(np.abs(weights).max()) or 1.0
        axes[2].imshow(mark_boundaries(image, arrays["segments"], color=(1, 1, 0)))
        axes[2].imshow(weights, cmap="RdBu_r", alpha=0.5, vmin=-limit, vmax=limit)
    axes[2].set_title("LIME superpixel weights")
    for axis, key, label in (
        (axes[3], "cam_mask", "CAM mask"),
        (axes[4], "lime_mask", "LIME mask"),
    ):
        mask = arrays.get(key)
        if mask is None:
            axis.text(0.5, 0.5, "no mask\n(flagged)", ha="center", va="center")
        else:
            axis.imshow(image)
            axis.imshow(np.ma.masked_where(~mask, mask), cmap="autumn", alpha=0.6)
            label = f"{label} ({mask.mean():.0%} of pixels)"
        axis.set_title(label)
    for axis in axes:
        axis.axis("off")
    figure.suptitle(_title(result, method), fontsize=11)
    return figure


def iou_bar_chart(results: Sequence[ImageResult], method: str) -> Figure:
    """IoU per image with the mean as a line; flagged or failed images shown as gaps."""
    names = [plain_text(r.name) for r in results]
    values = [r.iou if r.iou is not None else math.nan for r in results]
    figure = new_figure(max(6, 0.9 * len(names) + 2), 4)
    axis = figure.add_subplot()
    axis.bar(range(len(names)), np.nan_to_num(values, nan=0.0), color="tab:blue")
    for index, value in enumerate(values):
        axis.text(
            index,
            (0 if math.isnan(value) else value) + 0.01,
            "n/a" if math.isnan(value) else f"{value:.2f}",
            ha="center",
            fontsize=8,
        )
    finite = [v for v in values if not math.isnan(v)]
    if finite:
        mean = float(np.mean(finite))
        axis.axhline(mean, color="tab:red", linestyle="--", label=f"mean {mean:.3f}")
        axis.legend(loc="upper right")
    axis.set_xticks(range(len(names)), names, rotation=30, ha="right")
    axis.set_ylim(0, 1.05)
    axis.set_ylabel("IoU (CAM mask vs LIME mask)")
    axis.set_title(plain_text(f"{method} vs LIME: IoU per image"))
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


def iou_vs_threshold(table: pd.DataFrame, settings: Sequence[str]) -> Figure:
    """Mean IoU ± std against cam_top_fraction, one line per combination of the other settings."""
    figure = new_figure(7.5, 4.5)
    axes = figure.add_subplot()
    lines = 0
    others = [key for key in settings if key != "cam_top_fraction"]
    groups = table.groupby(others, dropna=False, sort=True) if others else [((), table)]
    for values, part in groups:
        part = part.dropna(subset=["cam_top_fraction", "mean_iou"]).sort_values("cam_top_fraction")
        if part.empty:
            continue
        values = values if isinstance(values, tuple) else (values,)
        named = ", ".join(f"{k}={v}" for k, v in zip(others, values, strict=True))
        axes.errorbar(
            part["cam_top_fraction"],
            part["mean_iou"],
            yerr=part["std_iou"].fillna(0.0),
            marker="o",
            capsize=3,
            linestyle="--" if "area_matched" in values else "-",
            label=plain_text(named or "all runs"),
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
    return figure
