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

from xai_exp.agreement import agreement_metrics, curve_area
from xai_exp.cache import ExplanationCache, cache_key
from xai_exp.config import ConfigError, StudyConfig
from xai_exp.data import ImageItem
from xai_exp.explainers import lime as lime_explainer
from xai_exp.explainers.cam import compute_cam
from xai_exp.faithfulness import FaithfulnessCurves, deletion_insertion
from xai_exp.inference import prepare_for_inference
from xai_exp.masks import (
    DegenerateMapError,
    cam_top_fraction_mask,
    check_cam,
    lime_area_matched_mask,
    lime_top_k_mask,
    lime_weight_map,
)
from xai_exp.metrics import EXTRA_METRICS, iou
from xai_exp.models import Classifier, fit_to_input
from xai_exp.sanity import RandomisationResult, randomisation_check

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
    iou_auc: float | None = None
    spearman: float | None = None
    pointing_game: float | None = None
    cam_deletion_auc: float | None = None
    cam_insertion_auc: float | None = None
    lime_deletion_auc: float | None = None
    lime_insertion_auc: float | None = None
    randomisation_rho: float | None = None
    randomisation_passed: bool | None = None
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
        *EXTRA_METRICS,
        "randomisation_passed",
    )
    METRIC_COLUMNS = ("iou", *EXTRA_METRICS)

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
        self.keys: dict[str, str] = {}  # cache keys of the current image's explanations
        prepare_for_inference(classifier, cfg.precision)
        target = cfg.method.target_class
        if target is not None and target >= len(classifier.labels):
            raise ConfigError(
                f"method.target_class={target} is out of range: the model has "
                f"{len(classifier.labels)} classes (0..{len(classifier.labels) - 1})"
            )

    # -- cached explanation steps -------------------------------------------------------
    def _cached(
        self,
        kind: str,
        key: str,
        compute: Callable[[], dict[str, np.ndarray]],
        count: bool = True,
    ):
        """(arrays, seconds, reused) for an explanation, from the cache or computed now.

        `count` says whether it is an explanation (counted in computed/reused) or a metric.
        """
        entry = self.cache.load(kind, key)
        if entry is not None:
            self.reused += count
            return entry.arrays, float(entry.meta["seconds"]), True
        start = time.perf_counter()
        arrays = compute()
        seconds = time.perf_counter() - start
        self.computed += count
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
        self.keys["cam"] = key
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
        self.keys["lime"] = key
        return arrays["weights"], seconds, reused

    # -- metrics beyond IoU (cached: a threshold sweep recomputes none of them) -------------
    def faithfulness(self, view: np.ndarray, saliency: np.ndarray, source: str, target: int):
        """Deletion/insertion curves of one map; `source` is "cam" or "lime"."""
        metrics = self.cfg.metrics
        key = cache_key(
            kind="faithfulness",
            explanation=self.keys[source],
            steps=metrics.steps,
            baseline=metrics.baseline,
            algorithm_version=ALGORITHM_VERSION,
        )

        def compute() -> dict[str, np.ndarray]:
            curves = deletion_insertion(
                self.classifier,
                view,
                saliency,
                target,
                steps=metrics.steps,
                baseline=metrics.baseline,
                batch_size=metrics.batch_size,
            )
            return {
                "fractions": curves.fractions,
                "deletion": curves.deletion,
                "insertion": curves.insertion,
            }

        arrays, _, _ = self._cached("faithfulness", key, compute, count=False)
        return FaithfulnessCurves(
            fractions=arrays["fractions"],
            deletion=arrays["deletion"],
            insertion=arrays["insertion"],
            deletion_auc=curve_area(arrays["fractions"], arrays["deletion"]),
            insertion_auc=curve_area(arrays["fractions"], arrays["insertion"]),
        )

    def sanity(self, view: np.ndarray, target: int) -> RandomisationResult:
        """Model-parameter randomisation check of the CAM method on this image."""
        metrics, method = self.cfg.metrics, self.cfg.method
        key = cache_key(
            kind="sanity",
            explanation=self.keys["cam"],
            layers=metrics.sanity_layers,
            algorithm_version=ALGORITHM_VERSION,
        )

        def explain(classifier: Classifier) -> np.ndarray:
            return compute_cam(
                classifier,
                classifier.input_tensor(view),
                method.name,
                target,
                batch_size=method.batch_size,
                implementation=method.implementation,
            )

        def compute() -> dict[str, np.ndarray]:
            result = randomisation_check(self.classifier, explain, layers=metrics.sanity_layers)
            return {"rho": np.array([rho for _, rho in result.correlations])}

        arrays, _, _ = self._cached("sanity", key, compute, count=False)
        final = float(arrays["rho"][-1])
        return RandomisationResult(
            correlations=[("", float(rho)) for rho in arrays["rho"]],
            final_correlation=final,
            threshold=metrics.sanity_threshold,
            passed=abs(final) < metrics.sanity_threshold,
        )

    def _extra_metrics(self, result: ImageResult, view, cam, segments, weights, lime_mask):
        """Agreement, faithfulness and sanity metrics; degenerate maps add a reason."""
        metrics = self.cfg.metrics
        target = result.target_class
        reasons = []
        if metrics.agreement and lime_mask is not None:
            try:
                found = agreement_metrics(cam, segments, weights, lime_mask)
                result.iou_auc = found["iou_auc"]
                result.spearman = found["spearman"]
                result.pointing_game = found["pointing_game"]
            except DegenerateMapError as error:
                reasons.append(f"agreement: {error}")
        if metrics.faithfulness:
            curves = {}
            for source, saliency in (("cam", cam), ("lime", lime_weight_map(segments, weights))):
                try:
                    curves[source] = self.faithfulness(view, saliency, source, target)
                except DegenerateMapError as error:
                    reasons.append(f"{source} faithfulness: {error}")
                    continue
                setattr(result, f"{source}_deletion_auc", curves[source].deletion_auc)
                setattr(result, f"{source}_insertion_auc", curves[source].insertion_auc)
            result.arrays["faithfulness"] = curves
        if metrics.sanity:
            try:
                check = self.sanity(view, target)
                result.randomisation_rho = check.final_correlation
                result.randomisation_passed = check.passed
            except DegenerateMapError as error:
                reasons.append(f"sanity: {error}")
        return reasons

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
        if cam_mask is not None:  # a usable CAM map: the metrics beyond IoU apply
            reasons += self._extra_metrics(result, view, cam, segments, weights, lime_mask)
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
