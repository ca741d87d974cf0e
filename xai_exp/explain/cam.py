"""CAM saliency maps computed by the grad-cam package (and exact fast paths where we have them)."""

from __future__ import annotations

import contextlib
import importlib
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from xai_exp.explain.registry import (
    NETWORK_CODE,
    TRANSFORMERS,
    VIEW_CODE,
    ExplainerSpec,
    Family,
    Output,
    register,
)

if TYPE_CHECKING:  # torch loads with the model, not when a fully cached run starts
    import torch

    from xai_exp.models.classifier import Classifier

# Config name -> grad-cam class name: every CAM method grad-cam ships for classifiers.
CAM_METHODS: dict[str, str] = {
    "gradcam": "GradCAM",
    "hirescam": "HiResCAM",
    "gradcamplusplus": "GradCAMPlusPlus",
    "gradcamelementwise": "GradCAMElementWise",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "scorecam": "ScoreCAM",
    "ablationcam": "AblationCAM",
    "eigencam": "EigenCAM",
    "eigengradcam": "EigenGradCAM",
    "kpcacam": "KPCA_CAM",
    "fem": "FEM",
    "shapleycam": "ShapleyCAM",
    "fullgrad": "FullGrad",
    "randomcam": "RandomCAM",
}
GRADIENT_FREE = ("scorecam", "ablationcam", "eigencam", "kpcacam", "fem", "randomcam")
FORWARD_ONLY = ("scorecam",)  # whose fast path runs logits-only forward passes (the engine's)
_TRANSFORMER_LIMITS = {
    "ablationcam": "it ablates convolutional channels, not tokens",
    "fullgrad": "it needs the bias gradients of convolutional layers",
    "shapleycam": "grad-cam's ShapleyCAM does not reshape its second-order gradients",
}
# the modules whose code computes a CAM map (the fast path and the forward-pass engine are
# added to a key where they run: `xai_exp.study.pipeline`)
CAM_CODE = (*VIEW_CODE, *NETWORK_CODE, "xai_exp.explain.cam")
for _name, _class in CAM_METHODS.items():
    register(
        ExplainerSpec(
            _name,
            Family.ACTIVATION_CAM if _name in GRADIENT_FREE else Family.GRADIENT_CAM,
            Output.PIXELS,
            libraries=("torch", "torchvision", "grad-cam"),
            code=CAM_CODE,
            forward_only=_name in FORWARD_ONLY,
            description=f"grad-cam's {_class} at the target layer",
            refuses={family: _TRANSFORMER_LIMITS[_name] for family in TRANSFORMERS}
            if _name in _TRANSFORMER_LIMITS
            else {},
        )
    )
# grad-cam modules that print their own tqdm progress bars.
_NOISY_MODULES = ("pytorch_grad_cam.score_cam", "pytorch_grad_cam.ablation_cam")


def _classifier_target(target_class: int) -> object:
    # grad-cam (and the torchvision/OpenCV it loads) is imported when a map is computed, not
    # when a fully cached run starts
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    return ClassifierOutputTarget(target_class)


def check_method(name: str) -> None:
    """Raise ConfigError for a name that is not a registered CAM method."""
    from xai_exp.explain.registry import cam_method

    cam_method(name)


class _SilentTqdm:
    """Stand-in for tqdm.tqdm that iterates without printing."""

    def __init__(self, iterable=None, *args, **kwargs) -> None:
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)


@contextlib.contextmanager
def silenced_progress_bars() -> Iterator[None]:
    """Stop grad-cam's own progress bars for the duration (we show one bar over images)."""
    patched = []
    for module_name in _NOISY_MODULES:
        module = importlib.import_module(module_name)
        tqdm_module = module.tqdm
        patched.append((tqdm_module, tqdm_module.tqdm))
        tqdm_module.tqdm = _SilentTqdm
    try:
        yield
    finally:
        for tqdm_module, original in patched:
            tqdm_module.tqdm = original


@contextlib.contextmanager
def _seeded_numpy(input_tensor: torch.Tensor) -> Iterator[None]:
    """numpy's global generator seeded from the image (RandomCAM draws its channel weights
    there), so a random map is reproducible and cacheable; the caller's state is restored."""
    state = np.random.get_state()
    np.random.seed(zlib.crc32(input_tensor.detach().cpu().numpy().tobytes()))
    try:
        yield
    finally:
        np.random.set_state(state)


def reference_cam(
    classifier: Classifier,
    input_tensor: torch.Tensor,
    method: str,
    target_class: int,
    batch_size: int = 32,
) -> np.ndarray:
    """The map grad-cam's own class computes for one normalised image (1x3xHxW): HxW float32."""
    check_method(method)
    import pytorch_grad_cam
    import torch

    cam_class = getattr(pytorch_grad_cam, CAM_METHODS[method])
    kwargs: dict[str, object] = {"batch_size": batch_size} if method == "ablationcam" else {}
    if classifier.reshape is not None:
        kwargs["reshape_transform"] = classifier.reshape  # a transformer's tokens as a map
    seeded = _seeded_numpy(input_tensor) if method == "randomcam" else contextlib.nullcontext()
    with silenced_progress_bars(), torch.enable_grad(), seeded:
        cam = cam_class(classifier.model, [classifier.target_layer], **kwargs)
        try:
            if method == "scorecam":
                cam.batch_size = batch_size
            grayscale = cam(
                input_tensor=input_tensor.to(classifier.device),
                targets=[_classifier_target(target_class)],
            )
        finally:
            cam.activations_and_grads.release()
    return np.asarray(grayscale[0], dtype=np.float32)


def compute_cam(
    classifier: Classifier,
    input_tensor: torch.Tensor,
    method: str,
    target_class: int,
    batch_size: int = 32,
    implementation: str = "fast",
    precision: str = "fp32",
) -> np.ndarray:
    """HxW CAM map in grad-cam's format; `fast` uses an exact fast path where one exists.

    `precision` applies to the fast paths; grad-cam's own classes always run fp32 (they fail
    under bf16 autocast).
    """
    check_method(method)
    if cam_implementation(classifier, method, implementation) == "fast":
        from xai_exp.explain import fast_cam

        fast = fast_cam.FAST_METHODS[method]
        return fast(classifier, input_tensor, target_class, batch_size, precision=precision)
    return reference_cam(classifier, input_tensor, method, target_class, batch_size)


def cam_implementation(classifier: Classifier, method: str, implementation: str) -> str:
    """Which implementation computes the map: ``fast`` (xai-exp's exact fast path, where one
    exists for this model) or ``grad-cam`` (the package's own class)."""
    if implementation == "fast":
        from xai_exp.explain import fast_cam

        if method in fast_cam.FAST_METHODS and fast_cam.supports(classifier, method):
            return "fast"
    return "grad-cam"
