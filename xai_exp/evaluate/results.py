"""What a study records: the per-image record, the metric registry and the run summary.

Every number the study reports per image is a `MetricSpec` in `METRICS`. The CSV columns, the
run-level MLflow metrics, the per-image MLflow series and the columns of ``xai-exp compare``
are all derived from this registry, so adding a metric is one `register(MetricSpec(...))` with
the function that computes it from an image's `Evidence`:

    register(MetricSpec(
        "cam_peak", "highest CAM value", Direction.HIGHER,
        compute=lambda evidence: float(evidence.cam.max()),
    ))

No MLflow, no Hydra here: the job and ``compare`` read the registry, not the other way round.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import numpy as np

from xai_exp.evaluate import localisation
from xai_exp.evaluate.agreement import Agreement, agreement
from xai_exp.evaluate.masks import DegenerateMapError, lime_weight_map
from xai_exp.evaluate.overlap import iou, summarize
from xai_exp.evaluate.statistics import mean_interval

if TYPE_CHECKING:
    from xai_exp.evaluate.faithfulness import FaithfulnessCurves
    from xai_exp.evaluate.sanity import RandomisationResult

Value = float | bool | None


class Status(str, Enum):
    """How an image ended: compared, flagged (no meaningful mask) or failed."""

    OK = "ok"
    FLAGGED = "flagged"
    ERROR = "error"

    def __str__(self) -> str:
        return self.value


class Direction(str, Enum):
    """Which way a metric is better."""

    HIGHER = "higher"
    LOWER = "lower"
    NEITHER = "neither"


class Stat(str, Enum):
    """How per-image values become run-level metrics (``<stat>_<name>``)."""

    MEAN = "mean"
    MEDIAN = "median"
    STD = "std"
    RATE = "rate"  # share of True among the images that have a value


# -- what a metric function sees ---------------------------------------------------------------


@dataclass
class Evidence:
    """One image's maps and masks, and cached access to the costly shared computations.

    `faithfulness(source)` and `sanity()` come from the study (they run the model and use the
    explanation cache); `shared` computes a value once per image for several metrics, and
    records a degenerate map as a problem instead of failing the image.
    """

    view: np.ndarray  # HxWx3 uint8, what both methods explain
    cam: np.ndarray  # HxW float
    segments: np.ndarray | None  # HxW int, superpixel ids 0..n-1 (a superpixel reference)
    weights: np.ndarray | None  # n float, the reference's weight per superpixel
    cam_mask: np.ndarray
    lime_mask: np.ndarray | None  # the reference's mask
    target: int
    faithfulness_of: Callable[[str, np.ndarray], FaithfulnessCurves]
    sanity_of: Callable[[], RandomisationResult]
    object_mask: np.ndarray | None = None  # HxW bool: the annotated object in the view
    reference_map: np.ndarray | None = None  # HxW: a pixel-map reference's map
    problems: dict[str, str] = field(default_factory=dict)
    _memo: dict[str, Any] = field(default_factory=dict, repr=False)

    def shared(self, label: str, compute: Callable[[], Any]) -> Any:
        """`compute()` once per image; None (and a problem named `label`) for a degenerate map."""
        if label not in self._memo:
            try:
                self._memo[label] = compute()
            except DegenerateMapError as error:
                self.problems[label] = str(error)
                self._memo[label] = None
        return self._memo[label]

    def computed(self, label: str) -> Any:
        """What `shared` computed under `label` for this image (None when it did not run)."""
        return self._memo.get(label)

    @property
    def lime_map(self) -> np.ndarray:
        """The reference's per-pixel map (LIME's weights painted on their superpixels)."""
        if self.reference_map is not None:
            return self.reference_map
        assert self.segments is not None
        assert self.weights is not None
        return lime_weight_map(self.segments, self.weights)

    def agreement(self) -> Agreement | None:
        """IoU curve, Spearman and pointing game (None without a reference mask)."""
        lime_mask = self.lime_mask
        if lime_mask is None:
            return None
        return self.shared("agreement", lambda: agreement(self.cam, self.lime_map, lime_mask))

    def curves(self, source: str) -> FaithfulnessCurves | None:
        """Deletion/insertion curves of the CAM map (`cam`) or the reference's map."""
        saliency = self.cam if source == "cam" else self.lime_map
        return self.shared(f"{source} faithfulness", lambda: self.faithfulness_of(source, saliency))

    def sanity(self) -> RandomisationResult | None:
        """The model-parameter randomisation check of the CAM method."""
        return self.shared("sanity", self.sanity_of)


# -- the registry ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricSpec:
    """One per-image metric: its name, meaning, direction, summary and producer.

    `compute` is None for the values the pipeline itself sets (IoU, timings). `requires` names
    the ``metrics.<flag>`` config switch that turns the metric on (None: always on). An
    `optional` metric (every computed one is) is reported only when some image has a value.
    """

    name: str
    description: str
    direction: Direction
    stats: tuple[Stat, ...] = (Stat.MEAN,)
    compute: Callable[[Evidence], Value] | None = None
    requires: str | None = None
    summary_names: Mapping[Stat, str] = field(default_factory=dict)
    optional: bool = False

    @property
    def reported_when_missing(self) -> bool:
        """Whether its run metrics appear (as NaN) when no image has a value."""
        return self.compute is None and not self.optional

    def run_metric(self, stat: Stat) -> str:
        """Run-level MLflow metric name of one statistic, e.g. ``mean_iou``."""
        return self.summary_names.get(stat, f"{stat.value}_{self.name}")

    @property
    def run_metrics(self) -> list[str]:
        """Run-level metric names of all its statistics, each mean with its interval."""
        names = []
        for stat in self.stats:
            names.append(self.run_metric(stat))
            if stat in AVERAGES:
                names.extend(interval_names(self.run_metric(stat)))
        return names

    @property
    def image_metric(self) -> str:
        """MLflow per-image series (step = image index), in its own section after the run's."""
        return f"{IMAGE_SERIES}/{self.name}"

    def enabled(self, flags: Mapping[str, bool]) -> bool:
        """Whether the ``metrics`` config switches it on."""
        return self.requires is None or bool(flags.get(self.requires, False))


IMAGE_SERIES = "per_image"  # MLflow's UI shows `per_image/...` as a section of its own
AVERAGES = (Stat.MEAN, Stat.RATE)  # the statistics that carry a bootstrap interval


def interval_names(metric: str) -> tuple[str, str]:
    """The names of a mean's 95% interval bounds: ``mean_iou_ci_low``, ``mean_iou_ci_high``."""
    return (f"{metric}_ci_low", f"{metric}_ci_high")


METRICS: dict[str, MetricSpec] = {}


def register(spec: MetricSpec) -> MetricSpec:
    """Add a metric to the registry (names are unique); returns it."""
    if spec.name in METRICS:
        raise ValueError(f"metric {spec.name!r} is already registered")
    if spec.name in RECORD_COLUMNS:
        raise ValueError(f"metric name {spec.name!r} is a results column already")
    METRICS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a metric from the registry (tests and plugins)."""
    METRICS.pop(name, None)


def computed_metrics() -> list[MetricSpec]:
    """The metrics with a compute function, in registration order."""
    return [spec for spec in METRICS.values() if spec.compute is not None]


def _agreement_value(name: str) -> Callable[[Evidence], Value]:
    def compute(evidence: Evidence) -> Value:
        found = evidence.agreement()
        return None if found is None else found.metrics()[name]

    return compute


def _curve_auc(source: str, kind: str) -> Callable[[Evidence], Value]:
    def compute(evidence: Evidence) -> Value:
        curves = evidence.curves(source)
        return None if curves is None else float(getattr(curves, f"{kind}_auc"))

    return compute


def _ground_truth(source: str, kind: str) -> Callable[[Evidence], Value]:
    """A ground-truth metric of the CAM (`cam`) or the reference (`reference`): None without an
    annotation."""

    def compute(evidence: Evidence) -> Value:
        target = evidence.object_mask
        if target is None or not target.any():
            return None
        if kind == "object_iou":
            mask = evidence.cam_mask if source == "cam" else evidence.lime_mask
            return None if mask is None else iou(mask, target)
        saliency = evidence.cam if source == "cam" else evidence.lime_map
        measure = {
            "pointing_game": localisation.pointing_game,
            "energy_pointing_game": localisation.energy_pointing_game,
            "relevance_mass": localisation.relevance_mass,
        }[kind]
        return measure(saliency, target)

    return compute


GROUND_TRUTH = (
    ("object_iou", "IoU of the {} mask with the annotated object", Stat.MEAN),
    ("pointing_game", "a maximum of the {} map lies inside the object (Quantus)", Stat.RATE),
    (
        "energy_pointing_game",
        "share of the {} map's positive energy inside the object (Score-CAM)",
        Stat.MEAN,
    ),
    (
        "relevance_mass",
        "the {} map's sum inside the object over its total (Quantus relevance mass accuracy)",
        Stat.MEAN,
    ),
)


def _sanity_rho(evidence: Evidence) -> Value:
    check = evidence.sanity()
    if check is None or not math.isfinite(check.final_correlation):
        return None  # a degenerate randomised map has no rho; randomisation_passed is False
    return check.final_correlation


def _sanity_passed(evidence: Evidence) -> Value:
    check = evidence.sanity()
    return None if check is None else check.passed


# Record columns that are not metrics: who the image is and what the model said.
RECORD_COLUMNS = (
    "image",
    "artifact_stem",
    "status",
    "reason",
    "predicted_class",
    "predicted_label",
    "probability",
    "true_class",
    "true_label",
    "target_class",
    "target_label",
    "cam_mask_fraction",
    "reference_mask_fraction",
    "iou_by_seed",
    "n_superpixels",
    "cam_reused",
    "reference_reused",
    "segmentation_reused",
)

# With several lime.seeds, which LIME a metric describes: IoU and its chance level, ceiling and
# agreement above chance are means over the seeds; every other LIME-derived metric (and the LIME
# map and mask the overlay draws) is the first seed's: its curves and checks cost forward passes.
SEED_MEAN = " (with several lime.seeds: the mean over seeds)"
FIRST_SEED = " (LIME: the first of lime.seeds)"

for _spec in (
    MetricSpec(
        "iou",
        "IoU of the CAM mask and the LIME mask at the threshold" + SEED_MEAN,
        Direction.HIGHER,
        stats=(Stat.MEAN, Stat.MEDIAN, Stat.STD),
    ),
    MetricSpec(
        "iou_corrected",
        "agreement above chance: (IoU - chance) / (ceiling - chance); 0 is what random masks "
        "of the same two sizes score on average, 1 the best those sizes allow" + SEED_MEAN,
        Direction.HIGHER,
        stats=(Stat.MEAN, Stat.MEDIAN),
    ),
    MetricSpec(
        "iou_chance",
        "chance level: the expected IoU of random masks of the same two sizes" + SEED_MEAN,
        Direction.NEITHER,
    ),
    MetricSpec(
        "iou_ceiling",
        "the highest IoU masks of these two sizes can reach (the smaller over the larger)"
        + SEED_MEAN,
        Direction.NEITHER,
    ),
    MetricSpec(
        "correct",
        "the predicted class is the image's true class (images with a known true class)",
        Direction.HIGHER,
        stats=(Stat.RATE,),
        summary_names={Stat.RATE: "top1_accuracy"},
        optional=True,
    ),
    MetricSpec(
        "cam_mask_short",
        "fewer pixels than the top fraction carry CAM signal (above the map's minimum): the CAM "
        "mask is that signal, smaller than asked",
        Direction.LOWER,
        stats=(Stat.RATE,),
        summary_names={Stat.RATE: "cam_mask_short_rate"},
        optional=True,
    ),
    MetricSpec(
        "lime_self_iou",
        "mean pairwise IoU of LIME's masks over its seeds (lime.seeds): LIME's agreement with "
        "itself; not a bound on agreement with it (a mask near the union of the seeds' masks "
        "can agree with each more than they agree with each other)",
        Direction.HIGHER,
        optional=True,
    ),
    MetricSpec("cam_seconds", "seconds for the CAM map", Direction.LOWER),
    MetricSpec(
        "reference_seconds",
        "seconds for the reference explainer (LIME: superpixels included)",
        Direction.LOWER,
    ),
    MetricSpec("segmentation_seconds", "seconds for LIME's superpixels", Direction.LOWER),
    MetricSpec(
        "iou_auc",
        "normalised area under the IoU curve of CAM and LIME top-f masks, f = 1%..50%" + FIRST_SEED,
        Direction.HIGHER,
        compute=_agreement_value("iou_auc"),
        requires="agreement",
    ),
    MetricSpec(
        "spearman",
        "Spearman rank correlation of the CAM map and LIME's per-pixel weight" + FIRST_SEED,
        Direction.HIGHER,
        compute=_agreement_value("spearman"),
        requires="agreement",
    ),
    MetricSpec(
        "pointing_game",
        "1 when the CAM's peak lies inside the LIME mask" + FIRST_SEED,
        Direction.HIGHER,
        compute=_agreement_value("pointing_game"),
        requires="agreement",
    ),
    MetricSpec(
        "cam_deletion_auc",
        "deletion AUC of the CAM map (Petsiuk et al.)",
        Direction.LOWER,
        compute=_curve_auc("cam", "deletion"),
        requires="faithfulness",
    ),
    MetricSpec(
        "cam_insertion_auc",
        "insertion AUC of the CAM map",
        Direction.HIGHER,
        compute=_curve_auc("cam", "insertion"),
        requires="faithfulness",
    ),
    MetricSpec(
        "reference_deletion_auc",
        "deletion AUC of the reference's map" + FIRST_SEED,
        Direction.LOWER,
        compute=_curve_auc("reference", "deletion"),
        requires="faithfulness",
    ),
    MetricSpec(
        "reference_insertion_auc",
        "insertion AUC of the reference's map" + FIRST_SEED,
        Direction.HIGHER,
        compute=_curve_auc("reference", "insertion"),
        requires="faithfulness",
    ),
    MetricSpec(
        "randomisation_rho",
        "Spearman rho of the CAM map with itself after the model's top layers are randomised",
        Direction.LOWER,
        compute=_sanity_rho,
        requires="sanity",
    ),
    MetricSpec(
        "randomisation_passed",
        "the CAM map changed when the model was randomised (|rho| below the threshold, and the "
        "map did not degenerate)",
        Direction.HIGHER,
        stats=(Stat.RATE,),
        compute=_sanity_passed,
        requires="sanity",
        summary_names={Stat.RATE: "randomisation_pass_rate"},
    ),
):
    register(_spec)
for _source, _label in (("cam", "CAM"), ("reference", "reference's")):
    for _kind, _text, _stat in GROUND_TRUTH:
        register(
            MetricSpec(
                f"{_source}_{_kind}",
                _text.format(_label) + (FIRST_SEED if _source == "reference" else ""),
                Direction.HIGHER,
                stats=(_stat,),
                compute=_ground_truth(_source, _kind),
                summary_names={Stat.RATE: f"{_source}_{_kind}_rate"},
            )
        )


# The reference's metrics were LIME's before any explainer could be the reference (#20):
# `compare` reads stores written then under these names.
FORMER_NAMES = {
    name: "lime" + name.removeprefix("reference")
    for name in (
        "reference_seconds",
        "reference_mask_fraction",
        "reference_deletion_auc",
        "reference_insertion_auc",
        *(f"reference_{kind}" for kind, _, _ in GROUND_TRUTH),
    )
}


def csv_columns() -> tuple[str, ...]:
    """The results table's columns: the record's, then every registered metric."""
    return (*RECORD_COLUMNS, *METRICS)


# -- the per-image record ----------------------------------------------------------------------


@dataclass
class ImageResult:
    """Everything known about one image after the study; `arrays` are for plots only."""

    name: str
    artifact_stem: str
    status: Status = Status.OK
    reason: str = ""
    predicted_class: int = -1
    predicted_label: str = ""
    probability: float = math.nan
    true_class: int | None = None  # None: no label, or one the model's classes do not have
    true_label: str = ""  # the model's name for the true class, else the label as found
    target_class: int = -1
    target_label: str = ""
    cam_mask_fraction: float = math.nan
    reference_mask_fraction: float = math.nan
    iou_by_seed: str = ""  # with several lime seeds: the CAM-vs-LIME IoU per seed, ";"-joined
    lime_seeds: tuple[int, ...] = ()  # the LIME seeds explained; masks and maps are the first's
    reference: str = "LIME"  # what the CAM is compared with, as figures name it
    n_superpixels: int = 0
    cam_reused: bool = False
    reference_reused: bool = False
    segmentation_reused: bool = False
    values: dict[str, Value] = field(default_factory=dict)  # registered metrics by name
    arrays: dict[str, Any] = field(default_factory=dict, repr=False)
    cache_keys: dict[str, str] = field(default_factory=dict)  # cam, segments, reference: keys

    @property
    def iou(self) -> float | None:
        """IoU of the two masks at the threshold (None when flagged or failed); with several
        LIME seeds, the mean over seeds."""
        value = self.values.get("iou")
        return None if value is None else float(value)

    @property
    def iou_per_seed(self) -> list[float | None]:
        """The CAM-vs-LIME IoU of each LIME seed, in `lime_seeds` order (empty: one seed)."""
        return (
            [float(v) if v else None for v in self.iou_by_seed.split(";")]
            if self.iou_by_seed
            else []
        )

    def row(self) -> dict[str, Any]:
        """One results-table row (the CSV and MLflow table columns)."""
        record = {name: getattr(self, name) for name in RECORD_COLUMNS if name != "image"}
        record["status"] = str(self.status)
        return {"image": self.name, **record, **{n: self.values.get(n) for n in METRICS}}


# -- run-level summary -------------------------------------------------------------------------


# mean_iou / mean_lime_self_iou; runs logged before #23.5 call it `ceiling_normalised_iou`
IOU_OVER_LIME_SELF_IOU = "iou_over_lime_self_iou"


def summary_metrics(results: list[ImageResult]) -> dict[str, float]:
    """Run-level metrics: image counts by status and each registered metric's statistics.

    Metrics the pipeline always sets (IoU, timings) are always present (NaN when no image has
    them); optional ones appear only when at least one image has a value. Every mean and rate
    has its 95% bootstrap interval over images (`interval_names`).
    """
    summary: dict[str, float] = {}
    for spec in METRICS.values():
        values = [r.values.get(spec.name) for r in results]
        if not spec.reported_when_missing and all(v is None for v in values):
            continue
        numbers = [v if v is None else float(v) for v in values]
        found = summarize(numbers)
        for stat in spec.stats:
            summary[spec.run_metric(stat)] = found["mean" if stat == Stat.RATE else stat.value]
            if stat in AVERAGES:
                bounds = mean_interval(numbers)
                summary.update(zip(interval_names(spec.run_metric(stat)), bounds, strict=True))
    self_agreement = summary.get("mean_lime_self_iou", math.nan)
    if self_agreement > 0:  # CAM-vs-LIME agreement over LIME's agreement with itself: a ratio,
        # not a share of a ceiling (it passes 1 when the CAM mask sits near the seeds' union)
        summary[IOU_OVER_LIME_SELF_IOU] = summary["mean_iou"] / self_agreement
    summary.update(
        n_images=len(results),
        n_compared=sum(r.iou is not None for r in results),
        n_flagged=sum(r.status == Status.FLAGGED for r in results),
        n_failed=sum(r.status == Status.ERROR for r in results),
    )
    return summary
