"""Exact fast paths for the forward-pass-heavy CAM methods: Score-CAM and Ablation-CAM.

Both return the map grad-cam's own class returns (same weights, same ReLU / min-max scaling /
resize), only computed with fewer and larger forward passes:

* Ablation-CAM: grad-cam replaces the target layer by an `AblationLayer` and re-runs the whole
  network once per target-layer channel. When the network after the target layer is a known
  pure function of the target layer's output (torchvision ResNets: remaining blocks, avgpool,
  flatten, fc; timm EfficientNets at `bn2`/`conv_head`: pooling and classifier), we run only
  that tail on all ablated activations, in large batches.
* Score-CAM: the masked inputs are built on the device and classified in batches of the caller's
  batch size through the inference copy of the network (see `xai_exp.models.inference`);
  channels whose normalised upsampled masks are bitwise identical (e.g. all-zero channels) are
  classified once.

Each fast function takes the keyword `precision` ("fp32" | "bf16", default fp32).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from torch import nn

from xai_exp.models import inference
from xai_exp.models.classifier import Classifier, autocast


class FastCam(Protocol):
    """A fast CAM: (classifier, 1x3xHxW input, target class, batch size) -> HxW map."""

    def __call__(
        self,
        classifier: Classifier,
        input_tensor: torch.Tensor,
        target_class: int,
        batch_size: int,
        *,
        precision: str = "fp32",
    ) -> np.ndarray: ...


ABLATION_VALUE = 1e7  # grad-cam's AblationLayer constant for layers whose minimum is not 0
TAIL_BATCH = 256  # ablated activations per tail batch (the tail is tiny next to the network)
_KEY_DECIMALS = 6  # rounding of the candidate key that groups possibly identical Score-CAM masks


# --------------------------------------------------------------------------- shared pieces


def _activations_and_logits(
    classifier: Classifier, input_tensor: torch.Tensor, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target-layer output (1xCxhxw fp32) and logits (1xK fp32) of one forward pass."""
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        captured.append(output.detach())

    handle = classifier.target_layer.register_forward_hook(hook)
    try:
        with torch.inference_mode(), autocast(classifier.device, precision):
            logits = classifier.model(input_tensor.to(classifier.device)).float()
    finally:
        handle.remove()
    found = captured[-1] if captured else None
    if classifier.reshape is not None and isinstance(found, torch.Tensor):
        found = classifier.reshape(found)  # a transformer's tokens as a map, as grad-cam does
    if not isinstance(found, torch.Tensor) or found.dim() != 4:
        raise ValueError(
            f"target layer {classifier.target_layer_name} must output an NxCxHxW tensor"
        )
    return found.float(), logits


def _finish_cam(weights: np.ndarray, activations: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """grad-cam's BaseCAM steps after the channel weights, for one image and one target layer.

    weights: C float32; activations: Cxhxw float32; size: (width, height). Returns HxW float32.
    """
    from pytorch_grad_cam.utils.image import scale_cam_image  # imported when first needed

    weighted = weights[None, :, None, None] * activations[None]
    cam = np.maximum(weighted.sum(axis=1), 0)
    scaled = scale_cam_image(cam, size)  # per-layer scaling + cv2 resize
    per_layer = np.maximum(np.concatenate([scaled[:, None, :]], axis=1), 0)
    return scale_cam_image(np.mean(per_layer, axis=1))[0]


def _target_size(input_tensor: torch.Tensor) -> tuple[int, int]:
    return input_tensor.size(-1), input_tensor.size(-2)


# --------------------------------------------------------------------------- Ablation-CAM


def _runs_stock_code(model: nn.Module, base: type, methods: tuple[str, ...]) -> bool:
    """`model` is a `base` whose forward methods are the library's own, with no hooks on it."""
    kind = type(model)
    return (
        isinstance(model, base)
        and all(getattr(kind, name) is getattr(base, name) for name in methods)
        and not model._forward_hooks
        and not model._forward_pre_hooks
    )


def _is_plain_resnet(model: nn.Module) -> bool:
    from torchvision.models.resnet import ResNet

    return _runs_stock_code(model, ResNet, ("forward", "_forward_impl"))


def resnet_tail(classifier: Classifier) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The function from the target layer's output to the logits, for torchvision ResNets.

    Supported targets: a stage (`layer1`..`layer4`) or one block of a stage (`layer4.-1`).
    None when the model is not a plain torchvision ResNet or the target is elsewhere.
    """
    model: Any = classifier.model  # a torchvision ResNet: its stages are attributes
    if not _is_plain_resnet(model):
        return None
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    target = classifier.target_layer
    rest: list[nn.Module] | None = None
    for index, stage in enumerate(stages):
        if target is stage:
            rest = stages[index + 1 :]
            break
        if isinstance(stage, nn.Sequential):
            blocks = list(stage)
            if any(target is block for block in blocks):
                position = next(i for i, block in enumerate(blocks) if target is block)
                rest = [*blocks[position + 1 :], *stages[index + 1 :]]
                break
    if rest is None:
        return None
    modules = [*rest, model.avgpool]

    def tail(activations: torch.Tensor) -> torch.Tensor:
        x = activations
        for module in modules:
            x = module(x)
        return model.fc(torch.flatten(x, 1))

    return tail


def _is_plain_timm_efficientnet(model: nn.Module) -> bool:
    from timm.models.efficientnet import EfficientNet

    return _runs_stock_code(model, EfficientNet, ("forward", "forward_head"))


def efficientnet_tail(classifier: Classifier) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The function from the target layer's output to the logits, for timm EfficientNets.

    Supported targets: the last feature map (`bn2`, after its activation) or `conv_head`.
    """
    model: Any = classifier.model  # a timm EfficientNet
    if not _is_plain_timm_efficientnet(model):
        return None
    if classifier.target_layer is model.bn2:
        return model.forward_head
    if classifier.target_layer is model.conv_head:
        return lambda activations: model.forward_head(model.bn2(activations))
    return None


def separable_tail(classifier: Classifier) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The network after the target layer as a function, where we know it exactly."""
    return resnet_tail(classifier) or efficientnet_tail(classifier)


def ablation_values(activations: torch.Tensor, num_channels: int, batch_size: int) -> torch.Tensor:
    """The value grad-cam's AblationLayer writes into each ablated channel (C values).

    AblationLayer zeroes the channel when the (batch) minimum is 0. Otherwise it writes
    `torch.min(output) - 1e7`, re-evaluated after each batch member was ablated, so the i-th
    member of each batch of `batch_size` gets min - (i+1)*1e7 (accumulated in the layer's dtype).
    """
    minimum = activations.min()
    if bool(minimum == 0):
        return torch.zeros(num_channels, dtype=activations.dtype, device=activations.device)
    values = []
    current = minimum
    for _ in range(min(batch_size, num_channels)):
        current = current - ABLATION_VALUE
        values.append(current)
    positions = torch.arange(num_channels, device=activations.device) % batch_size
    return torch.stack(values)[positions]


def fast_ablation_cam(
    classifier: Classifier,
    input_tensor: torch.Tensor,
    target_class: int,
    batch_size: int,
    *,
    precision: str = "fp32",
) -> np.ndarray:
    """grad-cam's AblationCAM map, recomputing only the network tail for each ablation."""
    tail = separable_tail(classifier)
    if tail is None:
        raise ValueError(f"no separable tail after {classifier.target_layer_name}; use grad-cam")
    activations, logits = _activations_and_logits(classifier, input_tensor, precision)
    original = np.float32(logits[0, target_class].item())
    channels = activations.shape[1]
    values = ablation_values(activations[0], channels, batch_size)
    scores = []
    with torch.inference_mode(), autocast(classifier.device, precision):
        for start in range(0, channels, TAIL_BATCH):
            stop = min(start + TAIL_BATCH, channels)
            ablated = activations.repeat(stop - start, 1, 1, 1)
            rows = torch.arange(stop - start, device=activations.device)
            ablated[rows, rows + start] = values[start:stop, None, None]
            scores.append(tail(ablated).float()[:, target_class])
    new_scores = torch.cat(scores).cpu().numpy().astype(np.float32)
    weights = (original - new_scores) / original
    return _finish_cam(weights, activations[0].cpu().numpy(), _target_size(input_tensor))


# --------------------------------------------------------------------------- Score-CAM


def score_cam_masks(activations: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """grad-cam ScoreCAM's masks for kxhxw activations: align_corners bilinear upsampling to
    `size` (height, width), then per-channel min-max normalisation. Returns kxHxW."""
    upsampled = F.interpolate(activations[None], size=size, mode="bilinear", align_corners=True)[0]
    flat = upsampled.view(upsampled.size(0), -1)
    maxs = flat.max(dim=-1)[0][:, None, None]
    mins = flat.min(dim=-1)[0][:, None, None]
    return (upsampled - mins) / (maxs - mins + 1e-8)


def unique_masks(activations: torch.Tensor, size: tuple[int, int]) -> list[int]:
    """For each channel, the first channel whose Score-CAM mask is bitwise identical to it.

    Channels are grouped by a cheap candidate key (their min-max normalised low-resolution map,
    rounded); only channels within a group are compared, exactly, at full resolution.
    """
    low = activations.detach().double().flatten(1).cpu().numpy()
    span = low.max(axis=1, keepdims=True) - low.min(axis=1, keepdims=True)
    normalised = np.round(
        (low - low.min(axis=1, keepdims=True)) / np.where(span > 0, span, 1), _KEY_DECIMALS
    )
    groups: dict[bytes, list[int]] = {}
    for channel, row in enumerate(normalised):
        groups.setdefault(row.tobytes(), []).append(channel)
    representative = list(range(len(low)))
    for members in groups.values():
        if len(members) < 2:
            continue
        masks = score_cam_masks(activations[members], size)
        reps: list[int] = []  # indices into members
        for index, channel in enumerate(members):
            match = next((r for r in reps if torch.equal(masks[r], masks[index])), None)
            if match is None:
                reps.append(index)
            else:
                representative[channel] = members[match]
    return representative


def fast_score_cam(
    classifier: Classifier,
    input_tensor: torch.Tensor,
    target_class: int,
    batch_size: int,
    *,
    precision: str = "fp32",
    skip_duplicates: bool = True,
) -> np.ndarray:
    """grad-cam's ScoreCAM map: batched masked inputs on the device, duplicate masks run once."""
    input_tensor = input_tensor.to(classifier.device)
    activations, _ = _activations_and_logits(classifier, input_tensor, precision)
    channels = activations.shape[1]
    size = (input_tensor.size(-2), input_tensor.size(-1))
    if skip_duplicates:
        representative = unique_masks(activations[0], size)
    else:
        representative = list(range(channels))
    unique = sorted(set(representative))
    unique_scores = []
    for start in range(0, len(unique), max(1, batch_size)):
        chunk = unique[start : start + batch_size]
        masks = score_cam_masks(activations[0, chunk], size)
        batch = input_tensor[:, None] * masks[None, :, None]  # grad-cam's product, 1xkx3xHxW
        logits = inference.forward_logits(classifier, batch[0], precision)
        unique_scores.append(logits[:, target_class].cpu())
    by_channel = dict(zip(unique, torch.cat(unique_scores).tolist(), strict=True))
    scores = torch.tensor([[by_channel[rep] for rep in representative]], dtype=torch.float32)
    weights = torch.softmax(scores, dim=-1).numpy()[0]
    return _finish_cam(weights, activations[0].cpu().numpy(), _target_size(input_tensor))


FAST_METHODS: dict[str, FastCam] = {
    "ablationcam": fast_ablation_cam,
    "scorecam": fast_score_cam,
}


def supports(classifier: Classifier, method: str) -> bool:
    """Whether the fast path for `method` applies to this model."""
    if method == "ablationcam":
        return separable_tail(classifier) is not None
    return method == "scorecam"
