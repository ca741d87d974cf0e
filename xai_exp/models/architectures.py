"""Architecture families: where a CAM looks by default, and how a transformer's tokens become a
feature map.

grad-cam needs a B x C x H x W map at the target layer. CNNs give one; vision transformers give
tokens, which a reshape transform turns into a map (grad-cam's `reshape_transform`): ViT / DeiT
drop their class (and distillation) tokens and lay the patch tokens on the patch grid; Swin's
blocks already give B x H x W x C, which only needs its channels moved first. The transform is
read from the model and the target layer's output shape (`layer_reshape`), never typed by the
user: any token layer grad-cam's examples use works, e.g. Swin's ``layers.-1.blocks.-1.norm2``
(B x 49 x C tokens, laid on their 7 x 7 grid as in grad-cam's ``swinT_example.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from xai_exp.config import ConfigError


@dataclass(frozen=True)
class TokensToGrid:
    """ViT / DeiT tokens (B x (prefix + h*w) x C) to a B x C x h x w map."""

    prefix_tokens: int
    grid: tuple[int, int]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, self.prefix_tokens :, :]
        height, width = self.grid
        if height * width != patches.shape[1]:  # another input size: a square grid
            height = width = math.isqrt(patches.shape[1])
        batch, _, channels = patches.shape
        return patches.reshape(batch, height, width, channels).permute(0, 3, 1, 2)


@dataclass(frozen=True)
class ChannelsFirst:
    """Swin's B x H x W x C block output to B x C x H x W."""

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return features.permute(0, 3, 1, 2)


Reshape = TokensToGrid | ChannelsFirst


@dataclass(frozen=True)
class Family:
    """An architecture family: its default target layer and its reshape transform
    (transformers). Which explainers it cannot run is each explainer's fact (`refusals`)."""

    name: str
    target_layer: str
    reshape: Reshape | None = None  # the default target layer's

    def refusals(self) -> dict[str, str]:
        """Explainer name -> why this family cannot run it (one line), from the registry."""
        from xai_exp.explain.registry import explainers

        return {spec.name: why for spec in explainers() if (why := spec.refusal(self.name))}

    def check_method(self, method: str, key: str = "method") -> None:
        """One line, before any compute, for an explainer this family cannot run."""
        from xai_exp.explain.registry import explainer

        refusal = explainer(method, key).refusal(self.name, key)
        if refusal is not None:
            raise ConfigError(refusal)


def _square(count: int) -> bool:
    return count > 0 and math.isqrt(count) ** 2 == count


def layer_reshape(family: Family, shape: tuple[int, ...]) -> Reshape | None:
    """The reshape that turns a target layer's output of `shape` into B x C x H x W.

    CNN families need none. In a transformer, B x N x C tokens go on a square grid: behind the
    family's prefix tokens (ViT's class token) when N minus them is a square, else all N (Swin's
    B x H*W x C, e.g. ``norm2``); a B x H x W x C map (Swin's ``norm1``, timm >= 0.9) gets its
    channels first, and a B x C x H x W map (a patch embedding's convolution) stays as it is.
    Anything else keeps the family's default, which the dry forward pass then refuses.
    """
    default = family.reshape
    if default is None:
        return None
    if len(shape) == 3:
        if isinstance(default, TokensToGrid) and _square(shape[1] - default.prefix_tokens):
            return default
        if _square(shape[1]):
            side = math.isqrt(shape[1])
            return TokensToGrid(0, (side, side))
    if len(shape) == 4:
        _, first, second, last = shape
        channels_last = first == second and last != first
        return ChannelsFirst() if channels_last else None
    return default


FAMILY_LAYERS = {  # the README's table: family -> default target layer
    "vit": "blocks.-1.norm1",
    "swin": "layers.-1.blocks.-1.norm1",
    "convnext": "stages.-1",
    "resnet": "layer4.-1",
    "efficientnet": "bn2",
    "mobilenet": "blocks.-1",
}


def family_of(net: nn.Module) -> Family:
    """The family of a network, from its structure (timm and torchvision classifiers)."""
    kind = type(net).__name__.lower()
    if hasattr(net, "patch_embed") and hasattr(net, "blocks"):
        grid = tuple(getattr(net.patch_embed, "grid_size", (0, 0)))
        prefix = int(getattr(net, "num_prefix_tokens", 1))
        return Family(
            "vit",
            FAMILY_LAYERS["vit"],
            TokensToGrid(prefix, (int(grid[0]), int(grid[1]))),
        )
    if "swin" in kind and hasattr(net, "layers"):
        return Family("swin", FAMILY_LAYERS["swin"], ChannelsFirst())
    if "convnext" in kind and hasattr(net, "stages"):
        return Family("convnext", FAMILY_LAYERS["convnext"])
    if hasattr(net, "layer4"):
        return Family("resnet", FAMILY_LAYERS["resnet"])
    if hasattr(net, "bn2") and hasattr(net, "conv_head") and "efficientnet" in kind:
        return Family("efficientnet", FAMILY_LAYERS["efficientnet"])
    if hasattr(net, "blocks") and hasattr(net, "conv_head"):
        return Family("mobilenet", FAMILY_LAYERS["mobilenet"])  # conv_head follows the pooling
    info = getattr(net, "feature_info", None)
    if info:
        last = info[-1] if isinstance(info, list) else None
        if isinstance(last, dict) and last.get("module"):
            return Family(kind, str(last["module"]))
    if isinstance(getattr(net, "features", None), nn.Sequential):
        return Family(kind, "features.-1")  # torchvision VGG, DenseNet, MobileNet, ...
    return Family(kind, "")
