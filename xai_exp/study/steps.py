"""Each cached step of one image's explanations: prediction, CAM, superpixels, LIME, any
registered explainer, and the costly metrics (faithfulness curves, the randomisation check).

A step takes what it depends on as arguments, is keyed by everything that makes its output
(the image, the model, its parameters, the libraries' versions and the code that computes it),
and is validated when read back. No state is kept between calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

import numpy as np

from xai_exp.cache import ExplanationCache, cache_key, code_digest
from xai_exp.config import (
    ConfigError,
    MethodConfig,
    StudyConfig,
    target_choice,
)
from xai_exp.data.images import ImageItem
from xai_exp.data.labels import ClassIndex
from xai_exp.explain.builtin import LIME_CODE
from xai_exp.explain.cam import CAM_CODE
from xai_exp.explain.registry import (
    FORWARD_CODE,
    NETWORK_CODE,
    VIEW_CODE,
    ExplainerSpec,
    Inputs,
    Output,
    display_name,
    explainer,
)
from xai_exp.explain.superpixels import SuperpixelWorkers, segment
from xai_exp.models.facts import DeferredClassifier
from xai_exp.models.threads import cpu_share
from xai_exp.models.views import SQUARE

# Modules that import torch are imported where a network runs: a rerun whose explanations
# are all cached never loads torch (see `model_facts`).
if TYPE_CHECKING:
    from xai_exp.evaluate.faithfulness import FaithfulnessCurves
    from xai_exp.evaluate.sanity import RandomisationResult
    from xai_exp.models.classifier import Classifier

log = logging.getLogger(__name__)

ALGORITHM_VERSION = 1  # bump when a change outside xai_exp's code alters what a step computes
VIEW_VERSION = 2  # of the model's view in cache keys (2: its library's transform, exactly)

# The modules whose code computes each cached step: their source is part of the step's keys
# (`cache.code_digest`), so editing them recomputes its entries and editing others does not.
# A step that depends on another's entry has that entry's key (and so its code) in its own.
STEP_CODE: dict[str, tuple[str, ...]] = {
    "prediction": (*VIEW_CODE, "xai_exp.models.classifier"),
    "cam": CAM_CODE,  # the CAM methods' registered code
    "fast cam": ("xai_exp.explain.fast_cam",),  # added where the fast path runs
    "segments": (*VIEW_CODE, "xai_exp.explain.superpixels"),
    "lime": LIME_CODE,  # LIME's registered code
    "faithfulness": (*NETWORK_CODE, *FORWARD_CODE, "xai_exp.evaluate.faithfulness"),
    "sanity": (*NETWORK_CODE, "xai_exp.evaluate.sanity", "xai_exp.evaluate.agreement"),
}


def _version(versions: dict[str, str], name: str) -> str:
    """A library's version, from those logged or looked up (a plugin's own libraries)."""
    if name not in versions:
        try:
            versions[name] = version(name)
        except Exception:  # noqa: BLE001 - an uninstalled checkout still runs
            versions[name] = "unknown"
    return versions[name]


def step_code(*steps: str) -> str:
    """The code digest of the modules that compute these steps (`STEP_CODE`)."""
    return code_digest(module for step in steps for module in STEP_CODE[step])


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose output we cache and log."""
    names = ("torch", "torchvision", "grad-cam", "lime", "scikit-image", "onnxruntime", "xai-exp")
    found: dict[str, str] = {}
    for name in names:
        _version(found, name)
    return found


def superpixel_worker_count(setting: int | None, device_type: str) -> int:
    """inference.workers as it applies: null gives a GPU up to 4 workers, a CPU none (its
    cores run the forward passes); a GPU leaves one of the CPUs this process may use free."""
    if setting is not None:
        return setting
    if device_type == "cpu":
        return 0
    return max(1, min(4, cpu_share().threads - 1))


@dataclass(frozen=True)
class Expect:
    """What one array of a step's output must be: its shape (None: any length), its dtype kind
    (``f`` floats, ``i`` integers, ``U`` text) and, for numbers, its range. Floats must be
    finite (NaN too where `nan` allows it)."""

    shape: tuple[int | None, ...]
    kind: str = "f"
    low: float | None = None
    high: float | None = None
    nan: bool = False


_KINDS = {"f": ("f", "floats"), "i": ("iu", "integers"), "U": ("U", "text")}
_ROUNDING = 1e-6  # range bounds allow float rounding


def _array_problem(name: str, array: np.ndarray, expect: Expect) -> str | None:
    found = array.shape
    fits = len(found) == len(expect.shape) and all(
        e is None or e == f for e, f in zip(expect.shape, found, strict=True)
    )
    if not fits:
        return f"{name!r} has shape {found}, expected {expect.shape}"
    if array.size == 0:
        return f"{name!r} is empty"
    kinds, words = _KINDS[expect.kind]
    if array.dtype.kind not in kinds:
        return f"{name!r} has dtype {array.dtype}, expected {words}"
    if expect.kind == "U":
        return None
    values = array[~np.isnan(array)] if expect.kind == "f" and expect.nan else array
    if expect.kind == "f" and not np.all(np.isfinite(values)):
        return f"{name!r} has non-finite values"
    if values.size and expect.low is not None and float(values.min()) < expect.low - _ROUNDING:
        return f"{name!r} has values below {expect.low:g} ({float(values.min()):.4g})"
    if values.size and expect.high is not None and float(values.max()) > expect.high + _ROUNDING:
        return f"{name!r} has values above {expect.high:g} ({float(values.max()):.4g})"
    return None


def _entry_problem(
    arrays: Mapping[str, np.ndarray],
    expected: Mapping[str, Expect],
    check: Callable[[Mapping[str, np.ndarray]], str | None] | None = None,
) -> str | None:
    """Why a step's arrays are not what it computes (None when they are): each array's shape,
    dtype and range, then `check` (what relates the values: ids, sums, lengths)."""
    for name, expect in expected.items():
        if name not in arrays:
            return f"no {name!r} array"
        problem = _array_problem(name, arrays[name], expect)
        if problem is not None:
            return problem
    return None if check is None else check(arrays)


def _seconds_problem(meta: Any) -> str | None:
    seconds = meta.get("seconds") if isinstance(meta, dict) else None
    if seconds is None:
        return "no seconds recorded"
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        return f"seconds recorded as {type(seconds).__name__}"
    if not 0 <= seconds < float("inf"):
        return f"seconds recorded as {seconds}"
    return None


def _contiguous_ids(arrays: Mapping[str, np.ndarray]) -> str | None:
    ids = np.unique(arrays["segments"])
    if ids[0] != 0 or ids[-1] != len(ids) - 1:
        return f"superpixel ids are not 0..n-1 ({len(ids)} ids from {ids[0]} to {ids[-1]})"
    return None


def _sums_to_one(arrays: Mapping[str, np.ndarray]) -> str | None:
    total = float(np.sum(arrays["probabilities"], dtype=np.float64))
    return None if abs(total - 1) <= 1e-3 else f"probabilities sum to {total:.4g}, not 1"


def _curves_of_one_length(arrays: Mapping[str, np.ndarray]) -> str | None:
    lengths = {len(arrays[name]) for name in ("fractions", "deletion", "insertion")}
    return None if len(lengths) == 1 else f"curves of lengths {sorted(lengths)}"


def _one_name_per_rho(arrays: Mapping[str, np.ndarray]) -> str | None:
    rho, layers = arrays["rho"], arrays["layers"]
    return None if len(rho) == len(layers) else f"{len(rho)} rho for {len(layers)} layers"


@dataclass(frozen=True)
class Step:
    """One cached step's output: its arrays, the seconds it took, whether it was reused."""

    arrays: dict[str, np.ndarray]
    seconds: float  # when reused: the seconds measured when it was computed
    reused: bool
    key: str  # cache key: later steps that depend on this one include it in theirs


def prepare_for_classifier(
    classifier: Classifier, cfg: StudyConfig, cache: ExplanationCache
) -> str:
    """Prepare the classifier's forward-only passes; returns the engine that runs them."""
    from xai_exp.models.inference import prepare_for_inference

    return prepare_for_inference(
        classifier,
        cfg.inference.engine,
        cfg.precision,
        graph_dir=cache.directory if cache.enabled else None,
    )


class CachedSteps:
    """The configured explanations of images, each step cached.

    Each step takes what it depends on as arguments (no state is kept between calls) and
    returns a `Step`. `computed` and `reused` count explanations over the whole study.
    """

    def __init__(
        self,
        cfg: StudyConfig,
        classifier: Classifier | DeferredClassifier,
        cache: ExplanationCache,
    ) -> None:
        """`classifier` built now, or deferred: its facts now, its network when a map or
        prediction is not cached."""
        self.cfg = cfg
        self.cache = cache
        self.precision = cfg.precision
        self.versions = library_versions()
        self.computed = 0
        self.reused = 0
        if isinstance(classifier, DeferredClassifier):
            self.model = classifier
        else:
            engine = prepare_for_classifier(classifier, cfg, cache)
            self.model = DeferredClassifier.ready(classifier, engine)
        self.facts = facts = self.model.facts
        self.classes = ClassIndex(facts.labels)
        self.target = target = target_choice(cfg.method.target_class)
        if isinstance(target, int) and target >= len(facts.labels):
            raise ConfigError(
                f"method.target_class={target} is out of range: the model has "
                f"{len(facts.labels)} classes (0..{len(facts.labels) - 1})"
            )
        self.reference = explainer(cfg.reference.name)
        self.reference_params = self.reference.with_params(cfg.reference.params)
        self.reference_label = display_name(self.reference.name)
        superpixels = self.reference.name == "lime" or self.reference.output == Output.SUPERPIXELS
        workers = superpixel_worker_count(cfg.inference.workers, facts.device.split(":")[0])
        workers = workers if superpixels else 0
        segmentation = cfg.lime.segmentation
        self.workers = (
            SuperpixelWorkers(workers, segmentation.algorithm, segmentation.params)
            if workers
            else None
        )
        self.prefetch_depth = 2 * workers

    @property
    def classifier(self) -> Classifier:
        """The network, built on first use when the study started from cached facts."""
        return self.model.get()

    # -- cached steps --------------------------------------------------------------------------
    def _cached(
        self,
        kind: str,
        key: str,
        compute: Callable[[], dict[str, np.ndarray] | tuple[dict[str, np.ndarray], float]],
        expected: Mapping[str, Expect],
        count: bool = True,
        check: Callable[[Mapping[str, np.ndarray]], str | None] | None = None,
    ) -> Step:
        """The step from the cache, or computed now and stored.

        `compute` returns the arrays, or the arrays and the seconds spent elsewhere (a worker
        process). `expected` gives each array's shape (None: any length), dtype and range, and
        `check` what relates their values; a cached entry that is not so (damaged, written by
        other code, forged with a valid checksum) is discarded with one warning and recomputed,
        and a computed output that is not so (a NaN map) is used but not stored. `count` says
        whether it is an explanation (counted in computed/reused) or a metric.
        """
        entry = self.cache.load(kind, key)
        if entry is not None:
            problem = _entry_problem(entry.arrays, expected, check) or _seconds_problem(entry.meta)
            if problem is None:
                self.reused += count
                return Step(entry.arrays, float(entry.meta["seconds"]), True, key)
            self.cache.discard(kind, key, problem)
        start = time.perf_counter()
        output = compute()
        seconds = time.perf_counter() - start
        arrays, seconds = output if isinstance(output, tuple) else (output, seconds)
        self.computed += count
        problem = _entry_problem(arrays, expected, check)
        if problem is None:
            self.cache.store(kind, key, arrays, {"seconds": seconds, "kind": kind})
        else:
            log.debug("%s not cached: %s", kind, problem)
        return Step(arrays, seconds, False, key)

    def _engine_key(self, runs_forward_passes: bool) -> dict[str, Any]:
        """The engine, for steps whose forward passes it runs (torch keeps the older keys)."""
        engine = self.facts.engine
        if runs_forward_passes and engine != "torch":
            return {"engine": engine, "engine_version": self.versions["onnxruntime"]}
        return {}

    def _base_key(self, item: ImageItem) -> dict[str, Any]:
        facts = self.facts
        spec = facts.view_spec
        view: dict[str, Any] = {}
        if spec.mode != SQUARE or spec.interpolation != "bicubic":
            # another view is another explanation (the full bicubic square keeps older keys);
            # version 2: the model's eval transform pixel for pixel (1 rounded its own way)
            view = {"view": [spec.mode, spec.resize, spec.interpolation, VIEW_VERSION]}
        return {
            "image": item.content_hash,
            "input_size": facts.input_size,
            "algorithm_version": ALGORITHM_VERSION,
            **view,
        }

    def _cam_map(
        self,
        classifier: Classifier,
        view: np.ndarray,
        target: int,
        method: MethodConfig | None = None,
    ) -> np.ndarray:
        from xai_exp.explain.cam import compute_cam

        method = method or self.cfg.method
        return compute_cam(
            classifier,
            classifier.input_tensor(view),
            method.name,
            target,
            batch_size=method.batch_size,
            implementation=method.implementation,
            precision=self.precision,
        )

    def prediction(self, item: ImageItem, view: np.ndarray) -> np.ndarray:
        """Class probabilities of the image's view (cached: a rerun needs no network)."""
        key = cache_key(
            **self._base_key(item),
            kind="prediction",
            model=self.facts.identity,
            precision=self.precision,
            versions=[self.versions["torch"]],
            code=step_code("prediction"),
        )
        classes = len(self.facts.labels)
        step = self._cached(
            "prediction",
            key,
            lambda: {"probabilities": self.classifier.predict(view, self.precision)[0]},
            {"probabilities": Expect((classes,), low=0, high=1)},
            count=False,
            check=_sums_to_one,
        )
        return step.arrays["probabilities"]

    def cam(
        self, item: ImageItem, view: np.ndarray, target: int, method: MethodConfig | None = None
    ) -> Step:
        """CAM map (``arrays["cam"]``) for the image's view and target class: `method`'s, by
        default the study's (a CAM as the reference has the same entries as the CAM itself)."""
        method = method or self.cfg.method
        fast = self.facts.cam_implementation(method.name, method.implementation) == "fast"
        forward_only = explainer(method.name, "method").forward_only and fast
        key = cache_key(
            **self._base_key(item),
            kind="cam",
            model=self.facts.identity,
            target_layer=self.facts.target_layer_name,
            method=method.name,
            implementation=method.implementation,
            precision=self.precision,
            target=target,
            versions=[self.versions[n] for n in ("torch", "torchvision", "grad-cam")],
            code=code_digest(
                [
                    *STEP_CODE["cam"],
                    *(STEP_CODE["fast cam"] if fast else ()),
                    *(FORWARD_CODE if fast and forward_only else ()),
                ]
            ),
            **self._engine_key(forward_only),
        )
        return self._cached(
            "cam",
            key,
            lambda: {"cam": self._cam_map(self.classifier, view, target, method)},
            {"cam": Expect(view.shape[:2])},
        )

    def explained(
        self,
        item: ImageItem,
        view: np.ndarray,
        target: int,
        spec: ExplainerSpec,
        params: Mapping[str, Any],
        segments: Step | None = None,
    ) -> Step:
        """A registered explainer's output for the image (``arrays["map"]``: HxW, or
        ``arrays["weights"]``: one per superpixel of `segments`), cached under its name, its
        params, its libraries' versions and its code."""
        reference = self.cfg.reference
        seed = reference.seed
        key = cache_key(
            **self._base_key(item),
            kind="explainer",
            explainer=spec.name,
            params=dict(sorted(params.items())),
            model=self.facts.identity,
            target=target,
            seed=seed,
            precision=self.precision,
            **(
                {"segments": segments.key, "hide_color": self.cfg.lime.hide_color}
                if segments
                else {}
            ),
            versions=[_version(self.versions, name) for name in spec.libraries],
            code=code_digest(spec.code),
            **self._engine_key(spec.forward_only),
        )
        assert spec.compute is not None
        compute = spec.compute

        def run() -> dict[str, np.ndarray]:
            inputs = Inputs(
                classifier=self.classifier,
                view=view,
                target=target,
                params=params,
                seed=seed,
                batch_size=reference.batch_size,
                precision=self.precision,
                segments=None if segments is None else segments.arrays["segments"],
                hide_color=self.cfg.lime.hide_color,
            )
            values = np.asarray(compute(inputs), dtype=np.float32)
            return {"weights" if segments is not None else "map": values}

        if segments is not None:
            count = int(segments.arrays["segments"].max()) + 1
            expected = {"weights": Expect((count,))}
        else:
            expected = {"map": Expect(view.shape[:2])}
        return self._cached("explainer", key, run, expected)

    def _segments_key(self, item: ImageItem) -> str:
        seg = self.cfg.lime.segmentation
        return cache_key(
            **self._base_key(item),
            kind="segments",
            algorithm=seg.algorithm,
            params=dict(seg.params),
            versions=[self.versions[n] for n in ("scikit-image", "lime")],
            code=step_code("segments"),
        )

    def segments(self, item: ImageItem, view: np.ndarray) -> Step:
        """LIME superpixels (``arrays["segments"]``), independent of model and sample count.

        Taken from the superpixel workers when `prefetch` queued them there.
        """
        seg = self.cfg.lime.segmentation
        key = self._segments_key(item)

        def compute() -> dict[str, np.ndarray] | tuple[dict[str, np.ndarray], float]:
            queued = self.workers.take(key) if self.workers is not None else None
            if queued is not None:
                return {"segments": queued[0]}, queued[1]
            return {"segments": segment(view, seg.algorithm, dict(seg.params))}

        expected = {"segments": Expect(view.shape[:2], "i", low=0)}
        return self._cached("segments", key, compute, expected, check=_contiguous_ids)

    def prefetch(self, item: ImageItem) -> None:
        """Queue the image's superpixels in a worker process, unless they are cached."""
        if self.workers is None:
            return
        key = self._segments_key(item)
        if not self.cache.contains("segments", key):
            self.workers.submit(key, self.facts.view(item.image))

    def close(self) -> None:
        """Stop the superpixel workers."""
        if self.workers is not None:
            self.workers.close()

    def lime(
        self, item: ImageItem, view: np.ndarray, segments: Step, target: int, seed: int
    ) -> Step:
        """LIME superpixel weights (``arrays["weights"]``) for the target class and seed."""
        cfg = self.cfg.lime
        key = cache_key(
            **self._base_key(item),
            kind="lime",
            model=self.facts.identity,
            segments=segments.key,
            target=target,
            num_samples=cfg.num_samples,
            hide_color=cfg.hide_color,
            seed=seed,
            implementation=cfg.implementation,
            precision=self.precision,
            versions=[self.versions[n] for n in ("torch", "torchvision", "lime")],
            code=step_code("lime"),
            **self._engine_key(cfg.implementation == "fast"),
        )

        def compute() -> dict[str, np.ndarray]:
            from xai_exp.explain import lime as lime_explainer

            fast = cfg.implementation == "fast"
            explain = lime_explainer.fast_lime if fast else lime_explainer.reference_lime
            explanation = explain(
                self.classifier,
                view,
                segments.arrays["segments"],
                target,
                num_samples=cfg.num_samples,
                hide_color=cfg.hide_color,
                seed=seed,
                batch_size=cfg.batch_size,
                precision=self.precision,
            )
            return {"weights": explanation.weights}

        superpixels = int(segments.arrays["segments"].max()) + 1
        return self._cached("lime", key, compute, {"weights": Expect((superpixels,))})

    # -- metrics beyond IoU (cached: a threshold sweep recomputes none of them) -------------
    def faithfulness(
        self, view: np.ndarray, saliency: np.ndarray, explanation_key: str, target: int
    ) -> FaithfulnessCurves:
        """Deletion/insertion curves of one map, cached under the explanation's key."""
        from xai_exp.evaluate.faithfulness import FaithfulnessCurves, deletion_insertion

        metrics = self.cfg.metrics
        key = cache_key(
            kind="faithfulness",
            explanation=explanation_key,
            # the xai_exp protocol's keys are as before protocols existed: its cache stays valid
            **(
                {"protocol": "rise"}
                if metrics.protocol == "rise"
                else {"steps": metrics.steps, "baseline": metrics.baseline}
            ),
            algorithm_version=ALGORITHM_VERSION,
            code=step_code("faithfulness"),
            **self._engine_key(True),
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
                protocol=metrics.protocol,
            )
            return {
                "fractions": curves.fractions,
                "deletion": curves.deletion,
                "insertion": curves.insertion,
            }

        points = (None,) if metrics.protocol == "rise" else (metrics.steps + 1,)
        expected = {
            name: Expect(points, low=0, high=1) for name in ("fractions", "deletion", "insertion")
        }
        arrays = self._cached(
            "faithfulness", key, compute, expected, count=False, check=_curves_of_one_length
        ).arrays
        return FaithfulnessCurves.from_scores(
            arrays["fractions"], arrays["deletion"], arrays["insertion"], metrics.protocol
        )

    def sanity(self, view: np.ndarray, target: int, cam_key: str) -> RandomisationResult:
        """Model-parameter randomisation check of the CAM method on this image."""
        from xai_exp.evaluate.sanity import RandomisationResult, randomisation_check

        metrics = self.cfg.metrics
        key = cache_key(
            kind="sanity",
            explanation=cam_key,
            layers=metrics.sanity_layers,
            protocol=2,  # 2: Quantus-style resets (running statistics too); degenerate = NaN
            algorithm_version=ALGORITHM_VERSION,
            code=step_code("sanity"),
        )

        def compute() -> dict[str, np.ndarray]:
            result = randomisation_check(
                self.classifier,
                lambda classifier: self._cam_map(classifier, view, target),
                layers=metrics.sanity_layers,
            )
            return {
                "rho": np.array([rho for _, rho in result.correlations]),
                "layers": np.array([name for name, _ in result.correlations]),
            }

        expected = {
            "rho": Expect((None,), low=-1, high=1, nan=True),
            "layers": Expect((None,), "U"),
        }
        arrays = self._cached(
            "sanity", key, compute, expected, count=False, check=_one_name_per_rho
        ).arrays
        steps = [
            (str(name), float(rho))
            for name, rho in zip(arrays["layers"], arrays["rho"], strict=True)
        ]
        return RandomisationResult.from_correlations(steps, metrics.sanity_threshold)
