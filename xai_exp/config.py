"""Typed configuration of one study run and its validation (no Hydra, no MLflow here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message is one line that says how to fix it."""


@dataclass
class ModelConfig:
    """Which classifier to explain and where to look inside it."""

    arch: str = "efficientnet_lite0"
    weights: str | None = "bundled"
    target_layer: str = "bn2"
    checkpoint: str | None = None
    input_size: int = 224


@dataclass
class DataConfig:
    """Which images to explain: the bundled samples, or every image in a folder."""

    source: str = "bundled"
    dir: str | None = None
    limit: int | None = None


@dataclass
class MethodConfig:
    """A CAM method of the grad-cam package, by its config name."""

    name: str = "gradcam"
    target_class: int | None = None
    batch_size: int = 64
    implementation: str = "fast"


@dataclass
class ThresholdConfig:
    """How maps become masks: CAM top fraction of pixels, LIME superpixel selection."""

    cam_top_fraction: float = 0.10
    lime_mode: str = "top_k"


@dataclass
class SegmentationConfig:
    """LIME superpixels: a scikit-image algorithm and its parameters.

    `params` is empty here (scikit-image's defaults): each ``conf/lime/*.yaml`` sets its
    algorithm's parameters, and a schema default would be merged into every one of them.
    """

    algorithm: str = "quickshift"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class LimeConfig:
    """LIME (lime_image) settings."""

    num_samples: int = 1000
    num_features: int = 5
    hide_color: int | None = None
    batch_size: int = 100
    seed: int = 0
    implementation: str = "fast"
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)


@dataclass
class TrackingConfig:
    """Where runs are logged."""

    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "xai-exp"
    run_name: str | None = None


@dataclass
class CacheConfig:
    """On-disk explanation cache (content addressed)."""

    enabled: bool = True
    dir: str | None = None


@dataclass
class MetricsConfig:
    """Which metrics beyond IoU: threshold-free agreement, deletion/insertion, randomisation."""

    agreement: bool = True
    faithfulness: bool = False
    sanity: bool = False
    steps: int = 20
    baseline: str = "blur"
    batch_size: int = 32
    sanity_layers: int | None = 3
    sanity_threshold: float = 0.5
    plugins: list[str] = field(default_factory=list)  # modules that register more metrics


@dataclass
class PlotsConfig:
    """The run's figures: file format and resolution (PNG only; PDF and SVG are vector)."""

    format: str = "png"
    dpi: int = 100


@dataclass
class StudyConfig:
    """The whole run: one model, one image set, one CAM method against LIME."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    lime: LimeConfig = field(default_factory=LimeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    plots: PlotsConfig = field(default_factory=PlotsConfig)
    device: str = "auto"
    precision: str = "fp32"
    progress: bool = True


DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
IMPLEMENTATIONS = ("fast", "reference")
LIME_MODES = ("top_k", "area_matched")
SEGMENTATIONS = ("quickshift", "slic", "felzenszwalb")
DATA_SOURCES = ("bundled", "folder")
BASELINES = ("black", "mean", "blur")
PLOT_FORMATS = ("png", "pdf", "svg")
MAX_SEED = 2**32 - 1  # numpy's RandomState, which seeds lime's perturbations
MAX_INPUT_SIZE = 2048
MAX_LIME_SAMPLES = 100_000  # lime holds every sample's superpixel mask in memory at once


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_choice(value: str, options: tuple[str, ...], key: str) -> None:
    _check(value in options, f"{key}={value!r} is not one of {', '.join(options)}")


def validate(cfg: StudyConfig) -> None:
    """Raise ConfigError (one line) for any value no run could use; cheap, runs before compute."""
    fraction = cfg.threshold.cam_top_fraction
    _check(
        0 < fraction <= 1,
        f"threshold.cam_top_fraction={fraction} must be in (0, 1], e.g. 0.1 for the top 10%",
    )
    _check_choice(cfg.threshold.lime_mode, LIME_MODES, "threshold.lime_mode")
    samples = cfg.lime.num_samples
    _check(
        1 <= samples <= MAX_LIME_SAMPLES,
        f"lime.num_samples={samples} must be in 1..{MAX_LIME_SAMPLES} (lime keeps every "
        "sample in memory; 1000 is lime's default)",
    )
    _check(
        0 <= cfg.lime.seed <= MAX_SEED,
        f"lime.seed={cfg.lime.seed} must be in 0..{MAX_SEED} (numpy's RandomState seeds)",
    )
    _check(cfg.lime.num_features >= 1, f"lime.num_features={cfg.lime.num_features} must be >= 1")
    _check(cfg.lime.batch_size >= 1, f"lime.batch_size={cfg.lime.batch_size} must be >= 1")
    _check(cfg.method.batch_size >= 1, f"method.batch_size={cfg.method.batch_size} must be >= 1")
    _check_choice(cfg.lime.implementation, IMPLEMENTATIONS, "lime.implementation")
    _check_choice(cfg.method.implementation, IMPLEMENTATIONS, "method.implementation")
    _check_choice(cfg.lime.segmentation.algorithm, SEGMENTATIONS, "lime.segmentation.algorithm")
    _check_choice(cfg.device, DEVICES, "device")
    _check_choice(cfg.precision, PRECISIONS, "precision")
    _check_choice(cfg.data.source, DATA_SOURCES, "data.source")
    _check(
        cfg.data.source != "folder" or bool(cfg.data.dir),
        "data.source=folder needs data.dir=PATH (a folder of images)",
    )
    _check(
        cfg.data.limit is None or cfg.data.limit >= 1, f"data.limit={cfg.data.limit} must be >= 1"
    )
    _check(
        8 <= cfg.model.input_size <= MAX_INPUT_SIZE,
        f"model.input_size={cfg.model.input_size} must be in 8..{MAX_INPUT_SIZE} pixels",
    )
    _check(cfg.metrics.steps >= 1, f"metrics.steps={cfg.metrics.steps} must be >= 1")
    _check(cfg.metrics.batch_size >= 1, f"metrics.batch_size={cfg.metrics.batch_size} must be >= 1")
    _check_choice(cfg.metrics.baseline, BASELINES, "metrics.baseline")
    _check_choice(cfg.plots.format, PLOT_FORMATS, "plots.format")
    _check(36 <= cfg.plots.dpi <= 1200, f"plots.dpi={cfg.plots.dpi} must be in 36..1200")
    layers = cfg.metrics.sanity_layers
    _check(layers is None or layers >= 1, f"metrics.sanity_layers={layers} must be >= 1 or null")
    target = cfg.method.target_class
    _check(target is None or target >= 0, f"method.target_class={target} must be >= 0 or null")
    _check(
        cfg.lime.hide_color is None or 0 <= cfg.lime.hide_color <= 255,
        f"lime.hide_color={cfg.lime.hide_color} must be null (segment mean) or 0..255",
    )
