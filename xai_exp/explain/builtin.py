"""The built-in explainers beyond grad-cam's CAMs (`cam` registers those): LIME, KernelSHAP,
Occlusion and Integrated Gradients (Captum's), and RISE.

Their code loads when a map is computed, so registering them imports neither torch nor Captum.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from xai_exp.explain.registry import ExplainerSpec, Family, Inputs, Output, register

# what every step starts from: the decoded image and the model's view and normalisation
_VIEW = ("xai_exp.data.images", "xai_exp.models.views")
_NETWORK = ("xai_exp.models.classifier", "xai_exp.models.architectures")
_FORWARD = ("xai_exp.models.inference", "xai_exp.models.onnx_engine")  # the forward-pass engine
LIME_CODE = (*_VIEW, *_NETWORK, *_FORWARD, "xai_exp.explain.lime")
_CAPTUM = (*_VIEW, *_NETWORK, "xai_exp.explain.captum_methods", "xai_exp.explain.builtin")


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


def _kernel_shap(inputs: Inputs) -> np.ndarray:
    from xai_exp.explain import captum_methods

    assert inputs.segments is not None
    return captum_methods.kernel_shap(
        inputs.classifier,
        inputs.view,
        inputs.segments,
        inputs.target,
        num_samples=int(inputs.params["num_samples"]),
        hide_color=inputs.hide_color,
        seed=inputs.seed,
        batch_size=inputs.batch_size,
        precision=inputs.precision,
    )


def _occlusion(inputs: Inputs) -> np.ndarray:
    from xai_exp.explain import captum_methods

    return captum_methods.occlusion(
        inputs.classifier,
        inputs.view,
        inputs.target,
        window=int(inputs.params["window"]),
        stride=int(inputs.params["stride"]),
        baseline=float(inputs.params["baseline"]),
        batch_size=inputs.batch_size,
        precision=inputs.precision,
    )


def _integrated_gradients(inputs: Inputs) -> np.ndarray:
    from xai_exp.explain import captum_methods

    return captum_methods.integrated_gradients(
        inputs.classifier,
        inputs.view,
        inputs.target,
        steps=int(inputs.params["steps"]),
        baseline=float(inputs.params["baseline"]),
        batch_size=inputs.batch_size,
    )


def _rise(inputs: Inputs) -> np.ndarray:
    from xai_exp.explain import rise

    return rise.rise(
        inputs.classifier,
        inputs.view,
        inputs.target,
        num_masks=int(inputs.params["num_masks"]),
        grid_size=int(inputs.params["grid_size"]),
        keep_probability=float(inputs.params["keep_probability"]),
        seed=inputs.seed,
        batch_size=inputs.batch_size,
        precision=inputs.precision,
    )


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
        code=(*_CAPTUM, *_FORWARD, "xai_exp.explain.lime"),
        forward_only=True,
        description="Captum's KernelShap over LIME's superpixels, hidden as LIME hides them",
        compute=_kernel_shap,
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
        code=(*_CAPTUM, *_FORWARD),
        forward_only=True,
        description="Captum's Occlusion: a sliding square window of `baseline`",
        compute=_occlusion,
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
        compute=_integrated_gradients,
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
        code=(*_VIEW, *_NETWORK, *_FORWARD, "xai_exp.explain.rise"),
        forward_only=True,
        description="RISE (Petsiuk et al., 2018): random low-resolution masks, weighted sum",
        compute=_rise,
        params={"num_masks": 2000, "grid_size": 7, "keep_probability": 0.5},
        check=_all(_positive("num_masks", "grid_size"), _keep_probability),
    )
)
