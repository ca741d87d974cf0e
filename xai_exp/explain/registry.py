"""Every explanation method xai-exp can run, one `ExplainerSpec` each, as `results` is for metrics.

A spec holds all of one method's facts: its family, what it returns (a pixel map or weights
over superpixels), the libraries whose versions are part of its cache key, the modules whose
code makes its maps, whether it needs gradients or only forward passes (forward-only ones run
on the forward-pass engine: ONNX Runtime on a CPU, the fast torch copy on a GPU), the model
families it cannot run and, for explainers the study runs generically, its compute function
and its parameters with their defaults. Adding an explainer is one module that calls
`register` and one ``conf/reference/<name>.yaml``:

    register(ExplainerSpec(
        "saliency", Family.GRADIENT_ATTRIBUTION, Output.PIXELS,
        libraries=("torch", "captum"), code=("my_plugin",), forward_only=False,
        compute=my_saliency, params={"absolute": True},
    ))

The CAM methods (grad-cam) and LIME are registered here too; they keep their own cached steps
in `xai_exp.study.pipeline` (whose cache keys predate the registry), the rest run through one
generic step. No MLflow, no Hydra here; torch and the libraries load when a map is computed.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import numpy as np

from xai_exp.config import ConfigError
from xai_exp.errors import describe

if TYPE_CHECKING:
    from xai_exp.models.classifier import Classifier


class Family(str, Enum):
    """How an explainer finds what matters."""

    ACTIVATION_CAM = "activation CAM"  # weights a layer's channels by forward passes or the maps
    GRADIENT_CAM = "gradient CAM"  # weights a layer's channels by gradients
    PERTURBATION = "perturbation"  # hides parts of the input and watches the score
    GRADIENT_ATTRIBUTION = "gradient attribution"  # gradients with respect to the input

    def __str__(self) -> str:
        return self.value


class Output(str, Enum):
    """What an explainer returns for one image."""

    PIXELS = "pixel map"  # HxW float, higher = more important
    SUPERPIXELS = "superpixel weights"  # one weight per superpixel of `lime.segmentation`

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Inputs:
    """What a compute function gets for one image."""

    classifier: Classifier
    view: np.ndarray  # HxWx3 uint8: the model's view of the image
    target: int  # the class explained
    params: Mapping[str, Any]  # the spec's params, with the config's values
    seed: int
    batch_size: int
    precision: str = "fp32"
    segments: np.ndarray | None = None  # HxW superpixel ids 0..n-1 (superpixel explainers)
    hide_color: int | None = None  # what a hidden superpixel shows (LIME's hide_color)


TRANSFORMERS = ("vit", "swin")  # model families whose target layer holds tokens

# Modules whose code goes into cache keys, by what they do (an explainer's `code` adds its own):
# the decoded image and the model's view every step starts from, the network (normalisation,
# token reshape), and the logits-only forward passes
VIEW_CODE = ("xai_exp.data.images", "xai_exp.models.views")
NETWORK_CODE = ("xai_exp.models.classifier", "xai_exp.models.architectures")
FORWARD_CODE = ("xai_exp.models.inference", "xai_exp.models.onnx_engine")


def display_name(name: str) -> str:
    """An explainer's name as figures, titles and the agreement matrix write it."""
    return "LIME" if name == "lime" else name


@dataclass(frozen=True)
class ExplainerSpec:
    """One explanation method: its facts and, for generic ones, how to compute it."""

    name: str
    family: Family
    output: Output
    libraries: tuple[str, ...]  # distributions whose versions are part of its cache key
    code: tuple[str, ...]  # modules whose source is part of its cache key
    forward_only: bool  # only forward passes (the forward-pass engine runs them)
    description: str = ""
    compute: Callable[[Inputs], np.ndarray] | None = None  # None: the study's own step
    params: Mapping[str, Any] = field(default_factory=dict)  # names and defaults
    refuses: Mapping[str, str] = field(default_factory=dict)  # model family -> why not
    check: Callable[[Mapping[str, Any]], str | None] | None = None  # params -> problem

    @property
    def is_cam(self) -> bool:
        """A grad-cam method: a map from a target layer, computed by the CAM step."""
        return self.family in (Family.ACTIVATION_CAM, Family.GRADIENT_CAM)

    def refusal(self, model_family: str, key: str = "method") -> str | None:
        """Why a model of `model_family` cannot run this explainer (one line), or None."""
        why = self.refuses.get(model_family)
        if why is None:
            return None
        return (
            f"{key}={self.name} does not work on {model_family} models ({why}); "
            "use gradcam, scorecam, layercam, eigencam, ..."
        )

    def with_params(self, given: Mapping[str, Any], key: str = "reference") -> dict[str, Any]:
        """The spec's params with the given values; ConfigError for an unknown or bad one."""
        unknown = [name for name in given if name not in self.params]
        if unknown:
            name = unknown[0]
            close = difflib.get_close_matches(name, list(self.params), n=1)
            hint = f"; did you mean {key}.params.{close[0]}?" if close else ""
            known = ", ".join(self.params) or "none"
            raise ConfigError(
                f"{key}.params.{name} is not a parameter of {self.name} (its parameters: "
                f"{known}){hint}"
            )
        merged = {**self.params, **given}
        problem = self.check(merged) if self.check is not None else None
        if problem:
            raise ConfigError(f"{key}={self.name}: {problem}")
        return merged


EXPLAINERS: dict[str, ExplainerSpec] = {}


def register(spec: ExplainerSpec) -> ExplainerSpec:
    """Add an explainer (a plugin module calls this when imported); a name is taken once."""
    existing = EXPLAINERS.get(spec.name)
    if existing is not None and existing != spec:
        raise ValueError(f"an explainer named {spec.name!r} is already registered")
    EXPLAINERS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove an explainer (tests and plugins)."""
    EXPLAINERS.pop(name, None)


def explainer(name: str, key: str = "reference") -> ExplainerSpec:
    """The spec of `name`; ConfigError (one line, with a did-you-mean) for an unknown one."""
    _register_builtins()
    spec = EXPLAINERS.get(name)
    if spec is None:
        close = difflib.get_close_matches(name, list(EXPLAINERS), n=1)
        hint = f"; did you mean {key}={close[0]}?" if close else ""
        raise ConfigError(
            f"{key}={name!r} is not a registered explainer (available: "
            f"{', '.join(EXPLAINERS)}){hint}"
        )
    return spec


def cam_method(name: str) -> ExplainerSpec:
    """The spec of a CAM method (`method=`): ConfigError for an unknown name or a non-CAM."""
    spec = explainer(name, key="method")
    if not spec.is_cam:
        cams = ", ".join(n for n, s in EXPLAINERS.items() if s.is_cam)
        raise ConfigError(
            f"method={name} is not a CAM method ({spec.family}); compare it as "
            f"reference={name}, or pick a CAM: {cams}"
        )
    return spec


def explainers() -> list[ExplainerSpec]:
    """Every registered explainer, built-in ones first."""
    _register_builtins()
    return list(EXPLAINERS.values())


def load_plugins(modules: Iterable[str]) -> None:
    """Import modules whose import registers explainers or metrics (``plugins``)."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 - any import failure is the user's to fix
            raise ConfigError(
                f"cannot import the plugin {name!r} ({describe(error)}); is its folder on "
                "PYTHONPATH?"
            ) from None


_BUILTINS = ("xai_exp.explain.cam", "xai_exp.explain.builtin")


def _register_builtins() -> None:
    """The built-in explainers register when their (light) spec modules are imported."""
    for module in _BUILTINS:
        importlib.import_module(module)
