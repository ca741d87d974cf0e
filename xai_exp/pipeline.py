"""One study over images: predict, explain (CAM and LIME, cached), threshold, compare."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from xai_exp.cache import ExplanationCache, cache_key
from xai_exp.config import ConfigError, StudyConfig
from xai_exp.data import ImageItem
from xai_exp.explainers import lime as lime_explainer
from xai_exp.explainers.cam import compute_cam
from xai_exp.masks import (
    DegenerateMapError,
    cam_top_fraction_mask,
    check_cam,
    lime_area_matched_mask,
    lime_top_k_mask,
)
from xai_exp.metrics import iou
from xai_exp.models import Classifier, fit_to_input

log = logging.getLogger(__name__)

ALGORITHM_VERSION = 1  # bump when a change alters what an explanation computes


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose output we cache and log."""
    names = ("torch", "torchvision", "grad-cam", "lime", "scikit-image", "xai-exp")
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except Exception:  # noqa: BLE001 - an uninstalled checkout still runs
            found[name] = "unknown"
    return found


@dataclass
class ImageResult:
    """Everything known about one image after the study; arrays are for plots only."""

    name: str
    artifact_stem: str
    status: str = "ok"  # ok | flagged | error
    reason: str = ""
    predicted_class: int = -1
    predicted_label: str = ""
    probability: float = math.nan
    target_class: int = -1
    target_label: str = ""
    iou: float | None = None
    cam_mask_fraction: float = math.nan
    lime_mask_fraction: float = math.nan
    n_superpixels: int = 0
    cam_seconds: float = math.nan
    lime_seconds: float = math.nan
    segmentation_seconds: float = math.nan
    cam_reused: bool = False
    lime_reused: bool = False
    segmentation_reused: bool = False
    arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    CSV_COLUMNS = (
        "image",
        "artifact_stem",
        "status",
        "reason",
        "predicted_class",
        "predicted_label",
        "probability",
        "target_class",
        "target_label",
        "iou",
        "cam_mask_fraction",
        "lime_mask_fraction",
        "n_superpixels",
        "cam_seconds",
        "lime_seconds",
        "segmentation_seconds",
        "cam_reused",
        "lime_reused",
        "segmentation_reused",
    )

    def row(self) -> dict[str, Any]:
        """One results-table row (the CSV and MLflow table columns)."""
        values = {name: getattr(self, name, None) for name in self.CSV_COLUMNS if name != "image"}
        return {"image": self.name, **values}


class Study:
    """Runs the configured explanations for images, reusing cached ones."""

    def __init__(self, cfg: StudyConfig, classifier: Classifier, cache: ExplanationCache) -> None:
        self.cfg = cfg
        self.classifier = classifier
        self.cache = cache
        self.versions = library_versions()
        self.computed = 0
        self.reused = 0
        target = cfg.method.target_class
        if target is not None and target >= len(classifier.labels):
            raise ConfigError(
                f"method.target_class={target} is out of range: the model has "
                f"{len(classifier.labels)} classes (0..{len(classifier.labels) - 1})"
            )

    # -- cached explanation steps -------------------------------------------------------
    def _cached(self, kind: str, key: str, compute: Callable[[], dict[str, np.ndarray]]):
        """(arrays, seconds, reused) for an explanation, from the cache or computed now."""
        entry = self.cache.load(kind, key)
        if entry is not None:
            self.reused += 1
            return entry.arrays, float(entry.meta["seconds"]), True
        start = time.perf_counter()
        arrays = compute()
        seconds = time.perf_counter() - start
        self.computed += 1
        self.cache.store(kind, key, arrays, {"seconds": seconds, "kind": kind})
        return arrays, seconds, False

    def _base_key(self, item: ImageItem) -> dict[str, Any]:
        return {
            "image": item.content_hash,
            "input_size": self.classifier.input_size,
            "algorithm_version": ALGORITHM_VERSION,
        }

    def cam(self, item: ImageItem, view: np.ndarray, target: int):
        """CAM map for the image's view and target class."""
        method = self.cfg.method
        key = cache_key(
            **self._base_key(item),
            kind="cam",
            model=self.classifier.identity,
            target_layer=self.classifier.target_layer_name,
            method=method.name,
            implementation=method.implementation,
            precision=self.cfg.precision,
            target=target,
            versions=[self.versions[n] for n in ("torch", "torchvision", "grad-cam")],
        )

        def compute() -> dict[str, np.ndarray]:
            tensor = self.classifier.input_tensor(view)
            cam = compute_cam(
                self.classifier,
                tensor,
                method.name,
                target,
                batch_size=method.batch_size,
                implementation=method.implementation,
            )
            return {"cam": cam}

        arrays, seconds, reused = self._cached("cam", key, compute)
        return arrays["cam"], seconds, reused

    def segments(self, item: ImageItem, view: np.ndarray):
        """LIME superpixels of the view (independent of model and sample count)."""
        seg = self.cfg.lime.segmentation
        params = dict(seg.params)
        key = cache_key(
            **self._base_key(item),
            kind="segments",
            algorithm=seg.algorithm,
            params=params,
            versions=[self.versions[n] for n in ("scikit-image", "lime")],
        )

        def compute() -> dict[str, np.ndarray]:
            return {"segments": lime_explainer.segment(view, seg.algorithm, params)}

        arrays, seconds, reused = self._cached("segments", key, compute)
        return arrays["segments"], seconds, reused, key

    def lime(self, item: ImageItem, view: np.ndarray, segments: np.ndarray, seg_key: str, target):
        """LIME superpixel weights for the target class."""
        cfg = self.cfg.lime
        key = cache_key(
            **self._base_key(item),
            kind="lime",
            model=self.classifier.identity,
            segments=seg_key,
            target=target,
            num_samples=cfg.num_samples,
            hide_color=cfg.hide_color,
            seed=cfg.seed,
            implementation=cfg.implementation,
            precision=self.cfg.precision,
            versions=[self.versions[n] for n in ("torch", "torchvision", "lime")],
        )

        def compute() -> dict[str, np.ndarray]:
            explain = (
                lime_explainer.fast_lime
                if cfg.implementation == "fast"
                else lime_explainer.reference_lime
            )
            explanation = explain(
                self.classifier,
                view,
                segments,
                target,
                num_samples=cfg.num_samples,
                hide_color=cfg.hide_color,
                seed=cfg.seed,
                batch_size=cfg.batch_size,
                precision=self.cfg.precision,
            )
            return {"weights": explanation.weights}

        arrays, seconds, reused = self._cached("lime", key, compute)
        return arrays["weights"], seconds, reused

    # -- one image -----------------------------------------------------------------------
    def explain(self, item: ImageItem) -> ImageResult:
        """Predict, explain and compare one image; degenerate maps are flagged, not masked."""
        result = ImageResult(name=item.name, artifact_stem=item.artifact_stem)
        view = fit_to_input(item.image, self.classifier.input_size)
        result.arrays["image"] = view
        probabilities = lime_explainer.classifier_fn(self.classifier, self.cfg.precision)(view)[0]
        result.predicted_class = int(np.argmax(probabilities))
        result.predicted_label = self.classifier.label(result.predicted_class)
        result.probability = float(probabilities[result.predicted_class])
        target = self.cfg.method.target_class
        result.target_class = result.predicted_class if target is None else int(target)
        result.target_label = self.classifier.label(result.target_class)

        cam, result.cam_seconds, result.cam_reused = self.cam(item, view, result.target_class)
        segments, result.segmentation_seconds, result.segmentation_reused, seg_key = self.segments(
            item, view
        )
        weights, lime_seconds, result.lime_reused = self.lime(
            item, view, segments, seg_key, result.target_class
        )
        # LIME's cost includes its superpixels, as lime_image computes them itself.
        result.lime_seconds = lime_seconds + result.segmentation_seconds
        result.n_superpixels = int(segments.max()) + 1
        result.arrays.update(cam=cam, segments=segments, lime_weights=weights)

        reasons = []
        try:
            check_cam(cam)
            cam_mask = cam_top_fraction_mask(cam, self.cfg.threshold.cam_top_fraction)
            result.arrays["cam_mask"] = cam_mask
            result.cam_mask_fraction = float(cam_mask.mean())
        except DegenerateMapError as error:
            reasons.append(str(error))
            cam_mask = None
        try:
            if self.cfg.threshold.lime_mode == "area_matched" and cam_mask is not None:
                lime_mask = lime_area_matched_mask(segments, weights, int(cam_mask.sum()))
            else:
                lime_mask = lime_top_k_mask(segments, weights, self.cfg.lime.num_features)
            result.arrays["lime_mask"] = lime_mask
            result.lime_mask_fraction = float(lime_mask.mean())
        except DegenerateMapError as error:
            reasons.append(str(error))
            lime_mask = None
        if self.cfg.threshold.lime_mode == "area_matched" and cam_mask is None:
            lime_mask = None
        if cam_mask is not None and lime_mask is not None:
            result.iou = iou(cam_mask, lime_mask)
        else:
            result.status = "flagged"
            result.reason = "; ".join(reasons)
        return result


def run_study(
    study: Study,
    items: Iterable[ImageItem],
    on_result: Callable[[int, ImageResult], None] | None = None,
    progress: bool = True,
) -> list[ImageResult]:
    """Explain every image; a failure in one image is recorded and the others go on."""
    items = list(items)
    results = []
    bar = tqdm(items, desc="explaining", unit="image", disable=not progress, leave=False)
    for index, item in enumerate(bar):
        bar.set_postfix_str(item.name[:30])
        try:
            result = study.explain(item)
        except (KeyboardInterrupt, ConfigError):
            raise
        except Exception as error:  # noqa: BLE001 - one bad image never loses the others
            log.warning("image %s failed: %s: %s", item.name, type(error).__name__, error)
            result = ImageResult(
                name=item.name,
                artifact_stem=item.artifact_stem,
                status="error",
                reason=f"{type(error).__name__}: {error}".splitlines()[0],
            )
        results.append(result)
        if on_result is not None:
            on_result(index, result)
    return results
