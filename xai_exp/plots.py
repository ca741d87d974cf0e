"""Figures: per-image overlays and the IoU bar chart (matplotlib, no display needed)."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from skimage.segmentation import mark_boundaries

from xai_exp.pipeline import ImageResult


def save_figure(figure: plt.Figure, path: Path) -> Path:
    """Save atomically (temp file, then rename), so no half-written PNG is ever seen."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".png")
    os.close(handle)
    try:
        figure.savefig(temp_name, dpi=100, bbox_inches="tight")
        os.replace(temp_name, path)
    finally:
        plt.close(figure)
        Path(temp_name).unlink(missing_ok=True)
    return path


def _title(result: ImageResult, method: str) -> str:
    score = "IoU n/a" if result.iou is None else f"IoU {result.iou:.3f}"
    head = f"{result.name}: {result.predicted_label} ({result.probability:.0%})  {method} vs LIME"
    tail = f"  {score}" + (f"  [{result.reason}]" if result.reason else "")
    return head + tail


def overlay_figure(result: ImageResult, method: str) -> plt.Figure:
    """Original, CAM overlay, LIME overlay, CAM mask and LIME mask, side by side."""
    arrays = result.arrays
    image = arrays["image"]
    figure, axes = plt.subplots(1, 5, figsize=(17, 4))
    axes[0].imshow(image)
    axes[0].set_title("image")
    axes[1].imshow(image)
    if "cam" in arrays:
        axes[1].imshow(arrays["cam"], cmap="jet", alpha=0.5, vmin=0, vmax=1)
    axes[1].set_title(f"{method} ({result.target_label})")
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


def iou_bar_chart(results: Sequence[ImageResult], method: str) -> plt.Figure:
    """IoU per image with the mean as a line; flagged or failed images shown as gaps."""
    names = [r.name for r in results]
    values = [r.iou if r.iou is not None else math.nan for r in results]
    figure, axis = plt.subplots(figsize=(max(6, 0.9 * len(names) + 2), 4))
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
    axis.set_title(f"{method} vs LIME: IoU per image")
    return figure
