"""The built-in explainers beyond grad-cam's CAMs (`cam` registers those): LIME, KernelSHAP,
Occlusion and Integrated Gradients (Captum's), and RISE.

Their code loads when a map is computed, so registering them imports neither torch nor Captum.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from xai_exp.explain.registry import (
    FORWARD_CODE,
    NETWORK_CODE,
    VIEW_CODE,
    ExplainerSpec,
    Family,
    Inputs,
    Output,
    register,
)

LIME_CODE = (*VIEW_CODE, *NETWORK_CODE, *FORWARD_CODE, "xai_exp.explain.lime")
_CAPTUM = (*VIEW_CODE, *NETWORK_CODE, "xai_exp.explain.captum_methods", "xai_exp.explain.builtin")


def _positive(*names: str) -> Callable[[Mapping[str, Any]], str | None]:
    """A params check: each named value is an integer >= 1."""

    def check(params: Mapping[str, Any]) -> str | None:
        for name in names:
            value = params[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                return f"params.{name}={value!r} must be an integer >= 1"
        return None

    return check


def _number(name: str) -> Callable[[Mapping[str, Any]], str | None]:
    def check(params: Mapping[str, Any]) -> str | None:
        value = params[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"params.{name}={value!r} must be a number"
        return None

    return check


def _all(*checks: Callable[[Mapping[str, Any]], str | None]) -> Callable:
    def check(params: Mapping[str, Any]) -> str | None:
        return next((problem for c in checks if (problem := c(params))), None)

    return check


def _calls(
    function: str,
    module: str = "xai_exp.explain.captum_methods",
    *,
    superpixels: bool = False,
    seeded: bool = False,
    engine: bool = True,
) -> Callable[[Inputs], np.ndarray]:
    """A compute function that calls `module.function(classifier, view, [segments,] target,
    **params, batch_size=...)`, with the seed, the precision (explainers on the forward-pass
    engine) and LIME's hidden colour where it takes them. The module loads at the first call."""

    def compute(inputs: Inputs) -> np.ndarray:
        explain = getattr(importlib.import_module(module), function)
        head = [inputs.classifier, inputs.view]
        extra: dict[str, Any] = {"batch_size": inputs.batch_size}
        if superpixels:
            head.append(inputs.segments)
            extra["hide_color"] = inputs.hide_color
        if seeded:
            extra["seed"] = inputs.seed
        if engine:
            extra["precision"] = inputs.precision
        return explain(*head, inputs.target, **inputs.params, **extra)

    return compute


def _keep_probability(params: Mapping[str, Any]) -> str | None:
    value = params["keep_probability"]
    ok = not isinstance(value, bool) and isinstance(value, int | float) and 0 < value <= 1
    return None if ok else f"params.keep_probability={value!r} must be in (0, 1]"


register(
    ExplainerSpec(
        "lime",
        Family.PERTURBATION,
        Output.SUPERPIXELS,
        libraries=("torch", "torchvision", "lime"),
        code=LIME_CODE,
        forward_only=True,
        description="lime's LimeImageExplainer over `lime.segmentation` superpixels",
    )
)
register(
    ExplainerSpec(
        "kernelshap",
        Family.PERTURBATION,
        Output.SUPERPIXELS,
        libraries=("torch", "captum"),
        code=(*_CAPTUM, *FORWARD_CODE, "xai_exp.explain.lime"),
        forward_only=True,
        description="Captum's KernelShap over LIME's superpixels, hidden as LIME hides them",
        compute=_calls("kernel_shap", superpixels=True, seeded=True),
        params={"num_samples": 200},
        check=_positive("num_samples"),
    )
)
register(
    ExplainerSpec(
        "occlusion",
        Family.PERTURBATION,
        Output.PIXELS,
        libraries=("torch", "captum"),
        code=(*_CAPTUM, *FORWARD_CODE),
        forward_only=True,
        description="Captum's Occlusion: a sliding square window of `baseline`",
        compute=_calls("occlusion"),
        params={"window": 16, "stride": 8, "baseline": 0.0},
        check=_all(_positive("window", "stride"), _number("baseline")),
    )
)
register(
    ExplainerSpec(
        "integrated_gradients",
        Family.GRADIENT_ATTRIBUTION,
        Output.PIXELS,
        libraries=("torch", "captum"),
        code=_CAPTUM,
        forward_only=False,
        description="Captum's IntegratedGradients from `baseline`, summed over channels",
        compute=_calls("integrated_gradients", engine=False),
        params={"steps": 32, "baseline": 0.0},
        check=_all(_positive("steps"), _number("baseline")),
    )
)
register(
    ExplainerSpec(
        "rise",
        Family.PERTURBATION,
        Output.PIXELS,
        libraries=("torch",),
        code=(*VIEW_CODE, *NETWORK_CODE, *FORWARD_CODE, "xai_exp.explain.rise"),
        forward_only=True,
        description="RISE (Petsiuk et al., 2018): random low-resolution masks, weighted sum",
        compute=_calls("rise", "xai_exp.explain.rise", seeded=True),
        params={"num_masks": 2000, "grid_size": 7, "keep_probability": 0.5},
        check=_all(_positive("num_masks", "grid_size"), _keep_probability),
    )
)
