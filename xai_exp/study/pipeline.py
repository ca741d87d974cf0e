"""One study over images: per image, the cached steps (`steps`), the reference's and the
CAM's masks, IoU with its chance level, the registered metrics; over a stream of images, with
superpixels computed ahead and one failing image never losing the others."""

from __future__ import annotations

import collections
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from xai_exp.config import (
    TRUE_CLASS,
    ConfigError,
    MethodConfig,
    lime_seeds,
)
from xai_exp.data.images import ImageItem
from xai_exp.errors import describe
from xai_exp.evaluate.masks import (
    DegenerateMapError,
    cam_top_fraction_mask,
    check_map,
    lime_area_matched_mask,
    lime_top_k_mask,
    signal_fraction,
)
from xai_exp.evaluate.overlap import chance_corrected, iou
from xai_exp.evaluate.results import Evidence, ImageResult, Status, computed_metrics
from xai_exp.explain.registry import Output
from xai_exp.study.steps import CachedSteps, Step

# Modules that import torch are imported where a network runs: a rerun whose explanations
# are all cached never loads torch (see `model_facts`).
if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


class Study(CachedSteps):
    """One study: the per-image flow from the cached steps to masks, IoU and metrics."""

    def _metrics(self, result: ImageResult, evidence: Evidence) -> list[str]:
        """Every registered metric the config switches on; problems become reasons."""
        flags = vars(self.cfg.metrics)
        reasons = []
        for spec in computed_metrics():
            if not spec.enabled(flags) or spec.compute is None:
                continue
            try:
                result.values[spec.name] = spec.compute(evidence)
            except DegenerateMapError as error:
                reasons.append(f"{spec.name}: {error}")
        problems = [f"{label}: {problem}" for label, problem in evidence.problems.items()]
        check = evidence.computed("sanity")
        if check is not None and check.problem:
            reasons.append(f"randomisation check failed: {check.problem}")
        return problems + reasons

    # -- masks and LIME's own spread ------------------------------------------------------------
    def _lime_mask(
        self, segments: np.ndarray, weights: np.ndarray, cam_mask: np.ndarray | None
    ) -> np.ndarray | None:
        """The LIME mask of the configured mode (None: area-matched without a CAM mask)."""
        if self.cfg.threshold.lime_mode == "area_matched":
            if cam_mask is None:
                return None
            return lime_area_matched_mask(segments, weights, int(cam_mask.sum()))
        return lime_top_k_mask(segments, weights, self.cfg.lime.num_features)

    def _seed_spread(
        self,
        result: ImageResult,
        item: ImageItem,
        view: np.ndarray,
        segments: Step,
        target: int,
        seeds: list[int],
        cam_mask: np.ndarray | None,
        first_mask: np.ndarray | None,
    ) -> None:
        """LIME explained with every further seed (each cached): the mean pairwise IoU of its
        masks (`lime_self_iou`, LIME's agreement with itself) and the CAM-vs-LIME IoU per seed,
        whose mean becomes the image's `iou` (its chance level, ceiling and agreement above
        chance too). The other LIME-derived metrics, the LIME mask drawn and
        `reference_mask_fraction` stay the first seed's."""
        masks = [first_mask]
        for seed in seeds[1:]:
            weights = self.lime(item, view, segments, target, seed).arrays["weights"]
            try:
                masks.append(self._lime_mask(segments.arrays["segments"], weights, cam_mask))
            except DegenerateMapError:
                masks.append(None)
        found = [mask for mask in masks if mask is not None]
        pairs = list(itertools.combinations(found, 2))
        if pairs:
            result.values["lime_self_iou"] = float(np.mean([iou(a, b) for a, b in pairs]))
        if cam_mask is None:
            return
        per_seed = [None if mask is None else chance_corrected(cam_mask, mask) for mask in masks]
        result.iou_by_seed = ";".join("" if v is None else f"{v['iou']:.4f}" for v in per_seed)
        known = [v for v in per_seed if v is not None]
        if known:
            for name in known[0]:  # iou and its chance, ceiling and corrected: means over seeds
                values = [float(v) for found in known if (v := found[name]) is not None]
                result.values[name] = float(np.mean(values)) if values else None
            result.status = Status.OK if result.status == Status.FLAGGED else result.status

    # -- one image -----------------------------------------------------------------------
    def explain(self, item: ImageItem) -> ImageResult:
        """Predict, explain and compare one image; degenerate maps are flagged, not masked."""
        try:
            return self._explain(item)
        finally:
            if self.workers is not None:
                self.workers.forget(self._segments_key(item))

    def _explain(self, item: ImageItem) -> ImageResult:
        result = ImageResult(
            name=item.name, artifact_stem=item.artifact_stem, reference=self.reference_label
        )
        view = self.facts.view(item.image)
        result.arrays["image"] = view
        probabilities = self.prediction(item, view)
        result.predicted_class = int(np.argmax(probabilities))
        result.predicted_label = self.facts.label(result.predicted_class)
        result.probability = float(probabilities[result.predicted_class])
        if item.label is not None:
            true_class = self.classes.lookup(item.label)
            result.true_class = true_class
            result.true_label = item.label if true_class is None else self.facts.label(true_class)
        if result.true_class is not None:
            result.values["correct"] = result.predicted_class == result.true_class
        if self.target == TRUE_CLASS:
            if result.true_class is None:
                result.status = Status.FLAGGED
                result.reason = "no known true class to explain (method.target_class=true)"
                return result
            target = result.true_class
        else:
            target = result.predicted_class if self.target is None else int(self.target)
        result.target_class = target
        result.target_label = self.facts.label(target)

        cam_step = self.cam(item, view, target)
        cam = cam_step.arrays["cam"]
        result.values["cam_seconds"] = cam_step.seconds
        result.cam_reused = cam_step.reused
        result.arrays["cam"] = cam
        result.cache_keys = {"cam": cam_step.key}
        seeds = lime_seeds(self.cfg.lime) if self.reference.name == "lime" else []
        reference = self._reference(item, view, target, seeds, result)

        reasons = []
        cam_mask = lime_mask = None
        try:
            check_map(cam)
            fraction = self.cfg.threshold.cam_top_fraction
            cam_mask = cam_top_fraction_mask(cam, fraction)
            result.arrays["cam_mask"] = cam_mask
            result.cam_mask_fraction = float(cam_mask.mean())
            signal = signal_fraction(cam)
            result.values["cam_mask_short"] = signal < fraction
            if signal < fraction:
                reasons.append(
                    f"CAM signal covers {signal:.1%} of the pixels, under the top {fraction:.0%} "
                    "asked: the CAM mask is the signal alone"
                )
        except DegenerateMapError as error:
            reasons.append(str(error))
        try:
            lime_mask = self._reference_mask(reference, cam_mask)
            if lime_mask is not None:
                result.arrays["lime_mask"] = lime_mask
                result.reference_mask_fraction = float(lime_mask.mean())
        except DegenerateMapError as error:
            reasons.append(str(error))
        if cam_mask is not None and lime_mask is not None:
            result.values.update(chance_corrected(cam_mask, lime_mask))
        else:
            result.status = Status.FLAGGED
        if len(seeds) > 1 and reference.segments is not None:
            self._seed_spread(
                result, item, view, reference.segments, target, seeds, cam_mask, lime_mask
            )
        if cam_mask is not None:  # a usable CAM map: the metrics beyond IoU apply
            evidence = Evidence(
                view=view,
                cam=cam,
                segments=reference.superpixels,
                weights=reference.weights,
                reference_map=reference.map,
                cam_mask=cam_mask,
                lime_mask=lime_mask,
                target=target,
                object_mask=None
                if item.object_mask is None
                else self.facts.view_mask(item.object_mask),
                faithfulness_of=lambda source, saliency: self.faithfulness(
                    view, saliency, (cam_step if source == "cam" else reference.step).key, target
                ),
                sanity_of=lambda: self.sanity(view, target, cam_step.key),
            )
            reasons += self._metrics(result, evidence)
            curves = {
                source: found
                for source in ("cam", "reference")
                if (found := evidence.computed(f"{source} faithfulness")) is not None
            }
            if curves:
                result.arrays["faithfulness"] = curves
        result.reason = "; ".join(reasons)
        return result

    # -- the reference explainer ------------------------------------------------------------------
    def _reference(
        self, item: ImageItem, view: np.ndarray, target: int, seeds: list[int], result: ImageResult
    ) -> Reference:
        """The reference explainer's output for the image, its timings and cache keys recorded
        in `result`: LIME (its first seed), a CAM method, or a registered explainer."""
        spec = self.reference
        if spec.name == "lime" or spec.output == Output.SUPERPIXELS:
            segment_step = self.segments(item, view)
            if spec.name == "lime":
                result.lime_seeds = tuple(seeds)  # the first seed's weights and mask are drawn
                step = self.lime(item, view, segment_step, target, seeds[0])  # and feed metrics
            else:
                step = self.explained(item, view, target, spec, self.reference_params, segment_step)
            segments = segment_step.arrays["segments"]
            weights = step.arrays["weights"]
            result.values["segmentation_seconds"] = segment_step.seconds
            # the reference's cost includes its superpixels (lime_image computes them itself)
            result.values["reference_seconds"] = step.seconds + segment_step.seconds
            result.segmentation_reused = segment_step.reused
            result.reference_reused = step.reused
            result.n_superpixels = int(segments.max()) + 1
            result.arrays.update(segments=segments, lime_weights=weights)
            result.cache_keys.update(segments=segment_step.key, reference=step.key)
            return Reference(step, segment_step, segments, weights, None)
        if spec.compute is None:  # a grad-cam method as the reference
            method = MethodConfig(
                name=spec.name,
                batch_size=self.cfg.reference.batch_size,
                implementation=self.cfg.reference.implementation,
            )
            step = self.cam(item, view, target, method)
            values = step.arrays["cam"]
        else:
            step = self.explained(item, view, target, spec, self.reference_params)
            values = step.arrays["map"]
        result.values["reference_seconds"] = step.seconds
        result.reference_reused = step.reused
        result.arrays["reference_map"] = values
        result.cache_keys["reference"] = step.key
        return Reference(step, None, None, None, values)

    def _reference_mask(
        self, reference: Reference, cam_mask: np.ndarray | None
    ) -> np.ndarray | None:
        """The reference's mask: LIME's rule for superpixel weights (top `lime.num_features`,
        or area-matched), else the top `threshold.cam_top_fraction` of its pixels (area-matched:
        the CAM mask's share). None: area-matched without a CAM mask."""
        if reference.weights is not None and reference.superpixels is not None:
            return self._lime_mask(reference.superpixels, reference.weights, cam_mask)
        values = reference.map
        assert values is not None
        check_map(values, f"{self.reference.name} map")
        if self.cfg.threshold.lime_mode == "area_matched":
            if cam_mask is None:
                return None
            return cam_top_fraction_mask(values, max(float(cam_mask.mean()), 1 / values.size))
        return cam_top_fraction_mask(values, self.cfg.threshold.cam_top_fraction)


@dataclass(frozen=True)
class Reference:
    """One image's reference explanation: its step, and either superpixels with weights or a
    pixel map."""

    step: Step
    segments: Step | None
    superpixels: np.ndarray | None
    weights: np.ndarray | None
    map: np.ndarray | None


def _ahead(
    items: Iterable[ImageItem], depth: int, prefetch: Callable[[ImageItem], None]
) -> Iterator[ImageItem]:
    """The items in order, with up to `depth` more already drawn and handed to `prefetch`
    (whose failures are left for the image's own turn)."""
    if depth <= 0:
        yield from items
        return
    waiting: collections.deque[ImageItem] = collections.deque()
    for item in items:
        try:
            prefetch(item)
        except Exception as error:  # noqa: BLE001 - the image fails (or not) when explained
            log.debug("prefetch of %s failed: %s", item.name, describe(error))
        waiting.append(item)
        if len(waiting) > depth:
            yield waiting.popleft()
    while waiting:
        yield waiting.popleft()


def run_study(
    study: Study,
    items: Iterable[ImageItem],
    on_result: Callable[[int, ImageResult], None] | None = None,
    progress: bool = True,
    seconds: dict[str, float] | None = None,
) -> list[ImageResult]:
    """Explain every image as it arrives; one failing image is recorded and the others go on.

    `items` may be a stream (an `ImageSet` decodes while it is iterated). `seconds`, when
    given, accumulates the wall time spent ``loading`` (waiting for the next image),
    ``explaining`` and ``writing`` (`on_result`).
    """
    spent = {"loading": 0.0, "explaining": 0.0, "writing": 0.0} if seconds is None else seconds
    for phase in ("loading", "explaining", "writing"):
        spent.setdefault(phase, 0.0)
    total = len(items) if isinstance(items, Sized) else None
    results: list[ImageResult] = []
    bar = tqdm(total=total, desc="explaining", unit="image", disable=not progress, leave=False)
    stream = _ahead(items, study.prefetch_depth, study.prefetch)
    clock = time.perf_counter()
    for index, item in enumerate(stream):
        now = time.perf_counter()
        spent["loading"] += now - clock
        clock = now
        bar.set_postfix_str(item.name[-30:])
        try:
            result = study.explain(item)
        except (KeyboardInterrupt, ConfigError):
            raise
        except Exception as error:  # noqa: BLE001 - one bad image never loses the others
            log.warning("image %s failed: %s", item.name, describe(error, 500))
            result = ImageResult(
                name=item.name,
                artifact_stem=item.artifact_stem,
                status=Status.ERROR,
                reason=describe(error, 500),
            )
        results.append(result)
        now = time.perf_counter()
        spent["explaining"] += now - clock
        clock = now
        if on_result is not None:
            on_result(index, result)
        bar.update()
        now = time.perf_counter()
        spent["writing"] += now - clock
        clock = now
    bar.close()
    return results
