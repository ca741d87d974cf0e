"""Inference-only copies of a classifier's network for the forward-pass-heavy explainers.

Score-CAM, Ablation-CAM and LIME spend nearly all their time in forward passes whose only
output is the logits. For those passes we use a copy of the network with every eval-mode
BatchNorm folded into the convolution that feeds it (found with hooks on one probe pass, checked
against the original logits) and weights stored channels_last, which oneDNN/cuDNN run faster.
Folding changes logits only by float rounding (~1e-6 relative); the original network is never
modified, so hooks, gradients and the grad-cam reference paths see the model as loaded.

`prepare_for_inference(classifier, engine)` builds the copy up front and picks the engine:
with ``onnxruntime`` (or ``auto`` on a CPU in fp32) the fp32 passes run through a checked
ONNX Runtime session of the model (`xai_exp.models.onnx_engine`); an export that fails falls back to
torch (`auto`, one info line) or is an error (`onnxruntime`). Without it, the torch copy is
built lazily on first use. Precision (`fp32`, or `bf16` autocast) is an argument of every
forward pass.
"""

from __future__ import annotations

import copy
import logging
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch import nn

from xai_exp.config import ConfigError
from xai_exp.models.classifier import Classifier, autocast
from xai_exp.models.onnx_engine import EngineUnavailableError, OnnxNetwork, onnx_network
from xai_exp.models.threads import apply_torch_threads

log = logging.getLogger(__name__)

# On this project's 2-core reference CPU, EfficientNet-Lite0 runs ~3x slower per image at batch
# 100 than at 16 (activations overflow the caches); ResNet-18 is flat from 16 to 32.
CPU_MAX_BATCH = 32
# ONNX Runtime's chunk: EfficientNet-Lite0 runs ~20% faster per image at 8-16 than at 32 there
# (ResNet-18 is flat from 4 to 32); the fixed-batch session is planned for this size.
ONNX_BATCH = 16


@dataclass
class _Prepared:
    network: nn.Module | None  # folded / channels_last copy; None: run the model itself
    channels_last: bool
    fused: bool
    fingerprint: tuple
    onnx: OnnxNetwork | None = None  # set by prepare_for_inference for the onnxruntime engine


_CACHE: weakref.WeakKeyDictionary[nn.Module, _Prepared] = weakref.WeakKeyDictionary()


def _fingerprint(model: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is replaced or modified in place."""
    return tuple(
        (tensor.data_ptr(), tensor._version, tensor.device.type)
        for tensor in (*model.parameters(), *model.buffers())
    )


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(module, nn.Conv2d) for module in model.modules())


def _replace_module(root: nn.Module, name: str, replacement: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, replacement)


def _without_batchnorm(bn: nn.Module) -> nn.Module | None:
    """What remains of an eval BatchNorm once its affine map lives in the conv before it."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    # timm's BatchNormAct2d: batch_norm, then self.drop, then self.act
    if type(bn).__name__ == "BatchNormAct2d" and hasattr(bn, "act") and hasattr(bn, "drop"):
        return nn.Sequential(cast(nn.Module, bn.drop), cast(nn.Module, bn.act))
    return None


def _fold_batchnorm(model: nn.Module, probe: torch.Tensor) -> nn.Module | None:
    """A copy with each eval BatchNorm2d folded into the Conv2d whose output it normalises.

    Pairs are found by running one probe forward pass with hooks (a BatchNorm whose input tensor
    is the output of a conv called once); the folded copy must reproduce the original logits on
    that probe (rel. 1e-4) or no folding is done. None when nothing could be folded.
    """
    network = copy.deepcopy(model).eval()
    names = {module: name for name, module in network.named_modules()}
    producer: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    calls: dict[nn.Module, int] = {}
    pairs: list[tuple[nn.Module, nn.Module]] = []

    def after_conv(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        calls[module] = calls.get(module, 0) + 1
        producer[id(output)] = (module, output)  # keep the tensor alive: ids stay unique

    def before_bn(module: nn.Module, inputs: tuple) -> None:
        calls[module] = calls.get(module, 0) + 1
        found = producer.get(id(inputs[0])) if inputs else None
        if found is not None and found[1] is inputs[0]:
            pairs.append((found[0], module))

    handles = []
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(after_conv))
        elif isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_pre_hook(before_bn))
    try:
        with torch.no_grad():
            reference = model(probe).float()
            network(probe)
    finally:
        for handle in handles:
            handle.remove()
        producer.clear()
    folded = 0
    with torch.no_grad():
        for conv_module, bn_module in pairs:
            conv = cast(nn.Conv2d, conv_module)
            bn = cast(nn.BatchNorm2d, bn_module)
            remainder = _without_batchnorm(bn)
            if (
                remainder is None
                or calls.get(conv) != 1
                or calls.get(bn) != 1
                or bn.running_mean is None
                or bn.running_var is None
            ):
                continue
            scale = torch.rsqrt(bn.running_var.float() + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight.float()
            shift = -bn.running_mean.float() * scale
            if bn.bias is not None:
                shift = shift + bn.bias.float()
            old_bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
            conv.weight.copy_(conv.weight * scale.view(-1, *([1] * (conv.weight.dim() - 1))))
            conv.bias = nn.Parameter((old_bias * scale + shift).to(conv.weight.dtype))
            _replace_module(network, names[bn], remainder)
            folded += 1
        if folded == 0:
            return None
        result = network(probe).float()
    tolerance = 1e-4 * max(1.0, float(reference.abs().max()))
    if result.shape != reference.shape or float((result - reference).abs().max()) > tolerance:
        log.debug("BatchNorm folding changed the logits; using the network as is")
        return None
    return network


def _build(model: nn.Module, probe: torch.Tensor, optimize: bool) -> _Prepared:
    fingerprint = _fingerprint(model)
    if not optimize or not _has_conv(model):
        return _Prepared(None, channels_last=False, fused=False, fingerprint=fingerprint)
    folded = _fold_batchnorm(model, probe)
    network = folded if folded is not None else copy.deepcopy(model).eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    network = network.to(memory_format=torch.channels_last)
    return _Prepared(network, channels_last=True, fused=folded is not None, fingerprint=fingerprint)


def _prepared(classifier: Classifier) -> _Prepared:
    model = classifier.model
    entry = _CACHE.get(model)
    if entry is None or entry.fingerprint != _fingerprint(model):
        generator = torch.Generator().manual_seed(0)
        size = classifier.input_size
        probe = torch.randn(1, 3, size, size, generator=generator).to(classifier.device)
        entry = _build(model, probe, optimize=True)
        _CACHE[model] = entry
    return entry


def resolve_engine(engine: str, device: torch.device, precision: str) -> str:
    """`auto` as it applies here: ONNX Runtime on a CPU in fp32, torch elsewhere."""
    if engine == "auto":
        return "onnxruntime" if device.type == "cpu" and precision == "fp32" else "torch"
    if engine == "onnxruntime" and (device.type != "cpu" or precision != "fp32"):
        raise ConfigError(
            f"inference.engine=onnxruntime runs fp32 on the CPU, not {precision} on "
            f"{device.type}; use inference.engine=auto"
        )
    if engine not in ("torch", "onnxruntime"):
        raise ConfigError(f"inference.engine={engine!r} is not one of auto, torch, onnxruntime")
    return engine


def prepare_for_inference(
    classifier: Classifier,
    engine: str = "torch",
    precision: str = "fp32",
    graph_dir: Path | None = None,
) -> str:
    """Build the inference network now; returns the engine its forward passes will use.

    `graph_dir` caches exported ONNX graphs (None: export in memory every time). torch and
    the ONNX session run the thread count in use (`xai_exp.models.threads`).
    """
    threads = apply_torch_threads()
    entry = _prepared(classifier)
    chosen = resolve_engine(engine, classifier.device, precision)
    entry.onnx = None
    if chosen == "onnxruntime":
        try:
            entry.onnx = onnx_network(
                classifier.model,
                classifier.identity,
                classifier.input_size,
                graph_dir,
                fixed_batch=ONNX_BATCH,
                threads=threads,
            )
        except EngineUnavailableError as error:
            if engine == "onnxruntime":
                raise ConfigError(
                    f"inference.engine=onnxruntime cannot run {classifier.arch}: {error}; "
                    "use inference.engine=torch"
                ) from None
            log.info("ONNX Runtime is not used for %s (%s); torch runs it", classifier.arch, error)
            chosen = "torch"
    return chosen


def inference_network(classifier: Classifier) -> nn.Module:
    """The torch network to run logits-only forward passes with (never used for hooks or
    gradients)."""
    network = _prepared(classifier).network
    return classifier.model if network is None else network


def max_batch(device: torch.device) -> int | None:
    """Largest batch one forward pass gets: CPU caches favour small batches, GPUs large ones."""
    return CPU_MAX_BATCH if device.type == "cpu" else None


def forward_logits(classifier: Classifier, batch: torch.Tensor, precision: str) -> torch.Tensor:
    """fp32 logits of a normalised NCHW batch through the inference network (inference mode).

    On CPU the batch is split into chunks of at most `CPU_MAX_BATCH` images. fp32 passes run
    through ONNX Runtime when `prepare_for_inference` chose it.
    """
    entry = _prepared(classifier)
    limit = max_batch(classifier.device) or len(batch)
    if entry.onnx is not None and precision == "fp32":
        limit = ONNX_BATCH
        with torch.inference_mode():
            chunks = [entry.onnx(batch[s : s + limit]) for s in range(0, len(batch), limit)]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    network = classifier.model if entry.network is None else entry.network
    outputs = []
    with torch.inference_mode(), autocast(classifier.device, precision):
        for start in range(0, len(batch), max(1, limit)):
            chunk = batch[start : start + limit]
            if entry.channels_last and chunk.dim() == 4:
                chunk = chunk.contiguous(memory_format=torch.channels_last)
            outputs.append(network(chunk).float())
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
