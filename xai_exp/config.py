"""Typed configuration of one study run and its validation (no Hydra, no MLflow here)."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message is one line that says how to fix it."""


# A key that changes no result (where runs are logged and cached, how work is batched or
# split, which metrics are on): `compare` puts runs that differ only in such keys in one row.
NO_RESULT = {"setting": False}


@dataclass
class ModelConfig:
    """Which classifier to explain and where to look inside it."""

    source: str = "auto"  # auto (bundled or torchvision by arch), torchvision, timm
    arch: str = "efficientnet_lite0"
    weights: str | None = "bundled"
    target_layer: str | None = "bn2"  # null: the architecture family's default
    checkpoint: str | None = None
    input_size: int | None = 224  # null: the model's own (timm data config, weights transforms)
    preprocess: str = "model"  # model: its crop fraction and interpolation; square: full crop
    kwargs: dict[str, Any] = field(default_factory=dict)  # timm.create_model arguments


@dataclass
class DataConfig:
    """Which images to explain: the bundled samples, or every image in a folder tree.

    `limit` keeps the first N files (sorted by path); `num_shards`/`shard` then take one
    deterministic part of them. True labels come from class folders, ImageNet synset ids in
    file names, or `manifest` (a CSV of file,label), in that order.
    """

    source: str = "bundled"
    dir: str | None = None
    limit: int | None = None
    recursive: bool = True
    manifest: str | None = None
    max_file_mb: float = field(default=200.0, metadata=NO_RESULT)
    # the pixel budget: a larger image is skipped from its header, never decoded (Pillow's own
    # default limit, 89.5 MP); allowed ones are decoded with memory bounded by it
    max_pixels: int = 89_478_485
    # one file's read + decode; null: no bound
    read_timeout_s: float | None = field(default=60.0, metadata=NO_RESULT)
    follow_external_symlinks: bool = False  # symlinks resolving outside data.dir are skipped
    # shards of one setting pool into one row
    num_shards: int = field(default=1, metadata=NO_RESULT)
    shard: int = field(default=0, metadata=NO_RESULT)
    # ground truth: a folder of object masks (by image stem), or boxes (a CSV, or ImageNet XML)
    masks_dir: str | None = None
    boxes: str | None = None


@dataclass
class MethodConfig:
    """A CAM method of the grad-cam package, by its config name."""

    name: str = "gradcam"
    # null: the predicted class; true: the image's true class; N: class index N
    target_class: int | bool | str | None = None
    batch_size: int = field(default=64, metadata=NO_RESULT)
    implementation: str = "fast"


@dataclass
class ReferenceConfig:
    """The explainer the CAM is compared with (``conf/reference/*.yaml``): `lime` (set by the
    ``lime:`` group), a CAM method, or any registered explainer (`xai_exp.explain.registry`)
    with its `params`. `seed`, `batch_size` and `implementation` apply to those beyond LIME."""

    name: str = "lime"
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    batch_size: int = field(default=64, metadata=NO_RESULT)
    implementation: str = "fast"  # a CAM as the reference: xai-exp's fast path or grad-cam's


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
    batch_size: int = field(default=100, metadata=NO_RESULT)
    seed: int = 0
    # several seeds per image (LIME's own spread): an explicit list, or `repeats` seeds from seed
    seeds: list[int] = field(default_factory=list)
    repeats: int = 1
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

    agreement: bool = field(default=True, metadata=NO_RESULT)
    faithfulness: bool = field(default=False, metadata=NO_RESULT)
    sanity: bool = field(default=False, metadata=NO_RESULT)
    protocol: str = "xai_exp"  # deletion/insertion: xai_exp (steps, baseline) or rise (RISE's)
    steps: int = 20
    baseline: str = "blur"
    batch_size: int = field(default=32, metadata=NO_RESULT)
    sanity_layers: int | None = 3
    sanity_threshold: float = 0.5
    # modules that register more metrics (`plugins` at the top registers explainers too)
    plugins: list[str] = field(default_factory=list, metadata=NO_RESULT)


@dataclass
class OutputsConfig:
    """Which per-image files a run writes: `overlays` is all, none, extremes or a number N.

    `extremes` (and N) keep every overlay up to the cap (`OVERLAY_CAP`, or N); past it the most
    and least agreeing images and a fixed random sample. The CSV always has every image.
    """

    overlays: str | int = "extremes"


@dataclass
class PlotsConfig:
    """The run's figures: file format and resolution (PNG only; PDF and SVG are vector)."""

    format: str = "png"
    dpi: int = 100


@dataclass
class InferenceConfig:
    """How forward-only passes run (Score-CAM, LIME, deletion/insertion).

    `engine`: auto (ONNX Runtime on CPU in fp32 when the model exports cleanly, else torch),
    torch or onnxruntime. `workers`: CPU processes that compute the superpixels of the next
    images while the current one is explained; null picks (GPU: up to 4, CPU: 0, inline).
    `threads`: torch and ONNX Runtime threads; null: the CPUs this process may use (its
    affinity, cgroup CPU quota, SLURM_CPUS_PER_TASK, OMP_NUM_THREADS; `xai_exp.models.threads`).
    """

    engine: str = "auto"
    workers: int | None = None
    threads: int | None = None


@dataclass
class StudyConfig:
    """The whole run: one model, one image set, one CAM method against a reference explainer
    (LIME by default)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    lime: LimeConfig = field(default_factory=LimeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig, metadata=NO_RESULT)
    cache: CacheConfig = field(default_factory=CacheConfig, metadata=NO_RESULT)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    plots: PlotsConfig = field(default_factory=PlotsConfig, metadata=NO_RESULT)
    outputs: OutputsConfig = field(default_factory=OutputsConfig, metadata=NO_RESULT)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    device: str = "auto"
    precision: str = "fp32"
    progress: bool = field(default=True, metadata=NO_RESULT)
    # modules imported before the study: they register explainers and metrics
    plugins: list[str] = field(default_factory=list, metadata=NO_RESULT)


DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
ENGINES = ("auto", "torch", "onnxruntime")
MODEL_SOURCES = ("auto", "torchvision", "timm")
PREPROCESSING = ("model", "square")
MAX_WORKERS = 64
MAX_THREADS = 1024
IMPLEMENTATIONS = ("fast", "reference")
LIME_MODES = ("top_k", "area_matched")
SEGMENTATIONS = ("quickshift", "slic", "felzenszwalb")
DATA_SOURCES = ("bundled", "folder")
BASELINES = ("black", "mean", "blur")
FAITHFULNESS_PROTOCOLS = ("xai_exp", "rise")
PLOT_FORMATS = ("png", "pdf", "svg")
MAX_SEED = 2**32 - 1  # numpy's RandomState, which seeds lime's perturbations
MAX_REPEATS = 20


def keys_without_results(schema: type = StudyConfig, prefix: str = "") -> tuple[str, ...]:
    """The config keys marked `NO_RESULT`, from the schema: ``tracking.`` for a whole group."""
    found: list[str] = []
    hints = typing.get_type_hints(schema)
    for item in dataclasses.fields(schema):
        key = f"{prefix}{item.name}"
        kind = hints[item.name]
        if item.metadata.get("setting") is False:
            found.append(f"{key}." if dataclasses.is_dataclass(kind) else key)
        elif dataclasses.is_dataclass(kind):
            found.extend(keys_without_results(typing.cast(type, kind), f"{key}."))
    return tuple(found)


def lime_seeds(lime: LimeConfig) -> list[int]:
    """The seeds LIME explains each image with: `seeds`, else `repeats` from `seed` on."""
    return list(lime.seeds) if lime.seeds else [lime.seed + i for i in range(lime.repeats)]


def random_weights(model: ModelConfig) -> bool:
    """True when the model keeps its random init: ``weights=null`` and no checkpoint.

    Its predictions and maps say nothing about a trained classifier.
    """
    return model.weights is None and not model.checkpoint


MAX_INPUT_SIZE = 2048
MAX_LIME_SAMPLES = 100_000  # lime holds every sample's superpixel mask in memory at once
OVERLAY_MODES = ("all", "none", "extremes")
OVERLAY_CAP = 48  # outputs.overlays=extremes: every overlay up to this many images
TRUE_CLASS = "true"  # method.target_class=true


def target_choice(value: int | bool | str | None) -> int | str | None:
    """method.target_class as the study uses it: None (predicted), "true" or a class index."""
    if value is None or value is False or (isinstance(value, str) and value == "predicted"):
        return None
    if value is True or (isinstance(value, str) and value.casefold() == TRUE_CLASS):
        return TRUE_CLASS
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and value >= 0:
        return value
    raise ConfigError(
        f"method.target_class={value!r} must be null (the prediction), true (the image's true "
        "class) or a class index >= 0"
    )


def overlay_cap(value: str | int) -> int | None:
    """outputs.overlays as a cap on overlay files: None for all, 0 for none."""
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if value in OVERLAY_MODES:
        return {"all": None, "none": 0, "extremes": OVERLAY_CAP}[str(value)]
    raise ConfigError(
        f"outputs.overlays={value!r} is not one of all, none, extremes or a number of images"
    )


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
    _check(
        not (cfg.lime.seeds and cfg.lime.repeats != 1),
        "set lime.seeds=[...] or lime.repeats=N, not both",
    )
    _check(
        1 <= cfg.lime.repeats <= MAX_REPEATS and len(cfg.lime.seeds) <= MAX_REPEATS,
        f"lime.repeats and lime.seeds allow 1..{MAX_REPEATS} seeds (each costs a LIME run)",
    )
    seeds = lime_seeds(cfg.lime)
    _check(
        all(0 <= s <= MAX_SEED for s in seeds) and len(set(seeds)) == len(seeds),
        f"lime seeds {seeds} must be distinct and in 0..{MAX_SEED}",
    )
    _check(cfg.lime.num_features >= 1, f"lime.num_features={cfg.lime.num_features} must be >= 1")
    _check(cfg.lime.batch_size >= 1, f"lime.batch_size={cfg.lime.batch_size} must be >= 1")
    _check(cfg.method.batch_size >= 1, f"method.batch_size={cfg.method.batch_size} must be >= 1")
    reference = cfg.reference
    _check(reference.batch_size >= 1, f"reference.batch_size={reference.batch_size} must be >= 1")
    _check(
        0 <= reference.seed <= MAX_SEED,
        f"reference.seed={reference.seed} must be in 0..{MAX_SEED}",
    )
    _check_choice(reference.implementation, IMPLEMENTATIONS, "reference.implementation")
    _check_choice(cfg.lime.implementation, IMPLEMENTATIONS, "lime.implementation")
    _check_choice(cfg.method.implementation, IMPLEMENTATIONS, "method.implementation")
    _check_choice(cfg.lime.segmentation.algorithm, SEGMENTATIONS, "lime.segmentation.algorithm")
    _check_choice(cfg.device, DEVICES, "device")
    _check_choice(cfg.precision, PRECISIONS, "precision")
    _check_choice(cfg.inference.engine, ENGINES, "inference.engine")
    _check(
        not (cfg.inference.engine == "onnxruntime" and cfg.precision != "fp32"),
        "inference.engine=onnxruntime runs fp32 only; drop precision=bf16 or use "
        "inference.engine=torch",
    )
    _check(
        not (cfg.inference.engine == "onnxruntime" and cfg.device == "cuda"),
        "inference.engine=onnxruntime runs on the CPU; with device=cuda use inference.engine=auto",
    )
    workers = cfg.inference.workers
    _check(
        workers is None or 0 <= workers <= MAX_WORKERS,
        f"inference.workers={workers} must be null (auto) or 0..{MAX_WORKERS} (0: inline)",
    )
    threads = cfg.inference.threads
    _check(
        threads is None or 1 <= threads <= MAX_THREADS,
        f"inference.threads={threads} must be null (the CPUs this job may use) or 1..{MAX_THREADS}",
    )
    _check_choice(cfg.data.source, DATA_SOURCES, "data.source")
    _check(
        cfg.data.source != "folder" or bool(cfg.data.dir),
        "data.source=folder needs data.dir=PATH (a folder of images)",
    )
    data = cfg.data
    _check(data.limit is None or data.limit >= 1, f"data.limit={data.limit} must be >= 1")
    _check(data.max_file_mb > 0, f"data.max_file_mb={data.max_file_mb} must be > 0")
    _check(data.max_pixels >= 1, f"data.max_pixels={data.max_pixels} must be >= 1")
    _check(
        data.read_timeout_s is None or data.read_timeout_s > 0,
        f"data.read_timeout_s={data.read_timeout_s} must be > 0 seconds (null: no bound)",
    )
    _check(data.num_shards >= 1, f"data.num_shards={data.num_shards} must be >= 1")
    _check(
        0 <= data.shard < data.num_shards,
        f"data.shard={data.shard} must be in 0..{data.num_shards - 1} (data.num_shards="
        f"{data.num_shards})",
    )
    size = cfg.model.input_size
    _check(
        size is None or 8 <= size <= MAX_INPUT_SIZE,
        f"model.input_size={size} must be null (the model's own) or 8..{MAX_INPUT_SIZE} pixels",
    )
    _check_choice(cfg.model.source, MODEL_SOURCES, "model.source")
    _check_choice(cfg.model.preprocess, PREPROCESSING, "model.preprocess")
    _check(cfg.metrics.steps >= 1, f"metrics.steps={cfg.metrics.steps} must be >= 1")
    _check(cfg.metrics.batch_size >= 1, f"metrics.batch_size={cfg.metrics.batch_size} must be >= 1")
    _check_choice(cfg.metrics.baseline, BASELINES, "metrics.baseline")
    _check_choice(cfg.metrics.protocol, FAITHFULNESS_PROTOCOLS, "metrics.protocol")
    _check_choice(cfg.plots.format, PLOT_FORMATS, "plots.format")
    _check(36 <= cfg.plots.dpi <= 1200, f"plots.dpi={cfg.plots.dpi} must be in 36..1200")
    layers = cfg.metrics.sanity_layers
    _check(layers is None or layers >= 1, f"metrics.sanity_layers={layers} must be >= 1 or null")
    target_choice(cfg.method.target_class)
    overlay_cap(cfg.outputs.overlays)
    _check(
        cfg.lime.hide_color is None or 0 <= cfg.lime.hide_color <= 255,
        f"lime.hide_color={cfg.lime.hide_color} must be null (segment mean) or 0..255",
    )


# Keys that the composed config ignores under a condition: (keys, ignored when, how to fix).
IGNORED_WHEN: tuple[tuple[tuple[str, ...], Callable[[StudyConfig], bool], str], ...] = (
    (
        (
            "data.recursive",
            "data.manifest",
            "data.max_file_mb",
            "data.follow_external_symlinks",
            "data.masks_dir",
            "data.boxes",
        ),
        lambda cfg: cfg.data.source != "folder",
        "the bundled photos are used; add data.dir=PATH",
    ),
    (
        ("data.shard",),
        lambda cfg: cfg.data.num_shards == 1,
        "data.num_shards is 1; set data.num_shards=N",
    ),
    (
        ("metrics.steps", "metrics.baseline", "metrics.batch_size", "metrics.protocol"),
        lambda cfg: not cfg.metrics.faithfulness,
        "deletion/insertion is off; add metrics=faithfulness",
    ),
    (
        ("metrics.steps", "metrics.baseline"),
        lambda cfg: cfg.metrics.faithfulness and cfg.metrics.protocol == "rise",
        "metrics.protocol=rise fixes its own steps and substrates; drop the key",
    ),
    (
        ("metrics.sanity_layers", "metrics.sanity_threshold"),
        lambda cfg: not cfg.metrics.sanity,
        "the randomisation check is off; add metrics.sanity=true",
    ),
    (("cache.dir",), lambda cfg: not cfg.cache.enabled, "the cache is off; drop cache=off"),
    (
        (
            "lime.num_samples",
            "lime.seed",
            "lime.seeds",
            "lime.repeats",
            "lime.batch_size",
            "lime.implementation",
        ),
        lambda cfg: cfg.reference.name != "lime",
        "the reference is not LIME; set the reference's own reference.params, or reference=lime",
    ),
    (
        ("reference.params", "reference.seed", "reference.batch_size"),
        lambda cfg: cfg.reference.name == "lime",
        "LIME's settings are lime.* (lime.num_samples, lime.seed, ...)",
    ),
    (
        ("model.kwargs",),
        lambda cfg: cfg.model.source != "timm",
        "they are timm.create_model's arguments; add model=timm",
    ),
    (
        ("lime.seed",),
        lambda cfg: bool(cfg.lime.seeds),
        "lime.seeds lists the seeds; put this one in the list",
    ),
    (
        ("tracking.uri", "tracking.experiment", "tracking.run_name"),
        lambda cfg: not cfg.tracking.enabled,
        "tracking is off; drop tracking.enabled=false",
    ),
)


def override_keys(overrides: Iterable[str]) -> list[str]:
    """The config keys that command-line overrides set (``+a.b=1`` -> ``a.b``; groups too)."""
    keys = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key and "=" in override:
            keys.append(key)
    return keys


def honour_data_dir(cfg: StudyConfig, overrides: Iterable[str]) -> StudyConfig:
    """`data.dir=PATH` alone means a folder study: the bundled source gives way to it.

    Only an explicit ``data=bundled`` beside it keeps the bundled photos (and is then an
    ignored override, see `ignored_overrides`).
    """
    chosen = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == "data"]
    if cfg.data.dir and cfg.data.source == "bundled" and "bundled" not in chosen:
        cfg.data.source = "folder"
    return cfg


def ignored_overrides(cfg: StudyConfig, overrides: Iterable[str]) -> list[str]:
    """One line for each override that the composed config would not use."""
    keys = override_keys(overrides)
    problems = []
    if "data.num_shards" in keys and "data.shard" not in keys and cfg.data.num_shards > 1:
        problems.append(
            f"data.num_shards={cfg.data.num_shards} without data.shard runs shard 0 only; set "
            f"data.shard=K, or sweep -m data.shard=0,...,{cfg.data.num_shards - 1}"
        )
    if "data.dir" in keys and cfg.data.source != "folder":
        problems.append("data.dir is ignored with data=bundled; drop data=bundled to use it")
    for names, ignored, fix in IGNORED_WHEN:
        for key in keys:
            if key in names and ignored(cfg):
                problems.append(f"{key} is ignored here: {fix}")
    return problems
