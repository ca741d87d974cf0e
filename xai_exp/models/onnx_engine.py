"""ONNX Runtime for logits-only forward passes on the CPU.

The classifier's network is exported once with torch.onnx (TorchScript exporter, dynamic batch)
and the graph cached by model identity under ``<cache dir>/onnx/``. Every session, fresh or
cached, is checked against torch's logits at each batch size it will run (one image, a partial
chunk, the full chunk) before it is used, so a graph that does not reproduce the model at any of
them (a batch axis fixed at export, a reshape that bakes the batch in) is never run. Gradients,
hooks and bf16 stay in torch.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xai_exp.cache import cache_key
from xai_exp.errors import describe
from xai_exp.files import atomic_path
from xai_exp.models.threads import threads_in_use

log = logging.getLogger(__name__)

OPSET = 17
EXPORT_PROTOCOL = 1  # bump when the export changes (names, axes, opset)
PROBE_IMAGES = 2  # the probe batch where no chunk size is given
PARTIAL_CHUNK = 3  # a last, partial chunk of LIME's samples or Score-CAM's masks
BATCH_AXIS = "batch"


class EngineUnavailableError(RuntimeError):
    """ONNX Runtime cannot run this model; the message says why in one line."""


def _versions() -> dict[str, str]:
    found = {}
    for name in ("torch", "onnx", "onnxruntime", "timm", "torchvision"):
        try:
            found[name] = version(name)
        except Exception:  # noqa: BLE001 - a package that is absent changes nothing here
            found[name] = "none"
    return found


def graph_path(directory: Path, identity: str, input_size: int) -> Path:
    """Where the exported graph of a model (by content identity) is cached."""
    key = cache_key(
        kind="onnx",
        model=identity,
        input_size=input_size,
        opset=OPSET,
        protocol=EXPORT_PROTOCOL,
        versions=_versions(),
    )
    return directory / "onnx" / f"{key}.onnx"


def export_graph(model: nn.Module, input_size: int) -> bytes:
    """The network as an ONNX graph (NCHW float input, any batch size); raises on failure."""
    probe = torch.zeros(1, 3, input_size, input_size)
    buffer = io.BytesIO()
    target: Any = buffer  # torch's stubs name paths only; the exporter writes to any file
    model = model.eval()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (probe,),
            target,
            dynamo=False,
            input_names=["pixels"],
            output_names=["logits"],
            dynamic_axes={"pixels": {0: BATCH_AXIS}, "logits": {0: BATCH_AXIS}},
            opset_version=OPSET,
            do_constant_folding=True,
        )
    return buffer.getvalue()


class OnnxNetwork:
    """An ONNX Runtime session called like the torch network: NCHW batch in, fp32 logits out.

    Batches of exactly `fixed_batch` images run in a second session whose batch dimension is
    fixed (ORT then folds timm's same-padding arithmetic and plans memory once: ~25% faster
    for EfficientNet-Lite0 on the reference CPU). That session is made on the first such batch
    and used only if it reproduces the dynamic session's logits on it.
    """

    def __init__(self, graph: bytes, threads: int, fixed_batch: int | None = None) -> None:
        self.graph = graph
        self.threads = max(1, threads)
        self.fixed_batch = fixed_batch
        self.session = self._session(None)
        self.input_name = self.session.get_inputs()[0].name
        self.fixed: Any = None  # None: not made yet; False: not usable

    def _session(self, batch: int | None) -> Any:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: ORT's own warnings are not the user's
        if batch is not None:
            options.add_free_dimension_override_by_name(BATCH_AXIS, batch)
        return onnxruntime.InferenceSession(self.graph, options, providers=["CPUExecutionProvider"])

    def _run(self, session: Any, pixels: np.ndarray) -> np.ndarray:
        logits = session.run(None, {self.input_name: pixels})[0]
        return np.asarray(logits, dtype=np.float32)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        pixels = np.ascontiguousarray(batch.detach().float().cpu().numpy())
        if len(pixels) != self.fixed_batch or self.fixed is False:
            return torch.from_numpy(self._run(self.session, pixels))
        if self.fixed is None:
            expected = self._run(self.session, pixels)
            try:
                fixed = self._session(len(pixels))
                found = self._run(fixed, pixels)
            except Exception as error:  # noqa: BLE001 - the dynamic session still works
                log.debug("fixed-batch ONNX session not used (%s)", describe(error))
                self.fixed = False
                return torch.from_numpy(expected)
            tolerance = 1e-4 * max(1.0, float(np.abs(expected).max()))
            self.fixed = fixed if float(np.abs(found - expected).max()) <= tolerance else False
            return torch.from_numpy(expected)
        return torch.from_numpy(self._run(self.fixed, pixels))


def probe_batches(fixed_batch: int | None) -> tuple[int, ...]:
    """The batch sizes a session is checked at: the chunks `inference.forward_logits` runs are
    1 to `fixed_batch` images (one image, a partial last chunk, a full chunk)."""
    return tuple(sorted({1, PARTIAL_CHUNK, fixed_batch or PROBE_IMAGES}))


def _check_parity(
    network: OnnxNetwork, model: nn.Module, input_size: int, batches: tuple[int, ...]
) -> None:
    axis = network.session.get_inputs()[0].shape[0]
    if isinstance(axis, int):
        raise EngineUnavailableError(f"its batch size is fixed at {axis}")
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(max(batches), 3, input_size, input_size, generator=generator)
    with torch.inference_mode():
        reference = model(probe).float()
    for size in batches:
        expected = reference[:size]
        try:
            found = network(probe[:size])
        except Exception as error:  # noqa: BLE001 - a graph that cannot run this batch size
            raise EngineUnavailableError(
                f"it fails at batch {size}: {describe(error, 120)}"
            ) from None
        if found.shape != expected.shape:
            raise EngineUnavailableError(
                f"its logits at batch {size} have shape {tuple(found.shape)}, torch's "
                f"{tuple(expected.shape)}"
            )
        tolerance = 1e-4 * max(1.0, float(expected.abs().max()))
        difference = float((found - expected).abs().max())
        if not difference <= tolerance:
            raise EngineUnavailableError(
                f"its logits at batch {size} differ from torch's by {difference:.2g}"
            )


def _checked_session(
    graph: bytes, model: nn.Module, input_size: int, fixed_batch: int | None, threads: int
) -> OnnxNetwork:
    try:
        network = OnnxNetwork(graph, threads, fixed_batch)
        _check_parity(network, model, input_size, probe_batches(fixed_batch))
    except EngineUnavailableError:
        raise
    except Exception as error:  # noqa: BLE001 - any runtime failure means "use torch"
        raise EngineUnavailableError(describe(error)) from None
    return network


def onnx_network(
    model: nn.Module,
    identity: str,
    input_size: int,
    directory: Path | None,
    fixed_batch: int | None = None,
    threads: int | None = None,
) -> OnnxNetwork:
    """A checked ONNX Runtime session for a CPU model; cached under `directory` when given.

    Its sessions run `threads` intra-op threads (None: `threads.threads_in_use`).

    A cached graph that cannot be read or does not reproduce the model at every batch size it
    will run is exported again (one warning).
    Raises `EngineUnavailableError` (one line) when onnxruntime is missing, the export fails or the
    graph's logits differ from torch's.
    """
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise EngineUnavailableError(
            "onnxruntime is not installed (pip install onnxruntime)"
        ) from None
    threads = threads_in_use().threads if threads is None else threads
    path = graph_path(directory, identity, input_size) if directory is not None else None
    if path is not None and path.is_file():
        try:
            return _checked_session(path.read_bytes(), model, input_size, fixed_batch, threads)
        except (OSError, EngineUnavailableError) as error:
            log.warning("cached ONNX graph %s is not used (%s); exporting again", path.name, error)
            with contextlib.suppress(OSError):
                path.unlink()
    try:
        graph = export_graph(model, input_size)
    except Exception as error:  # noqa: BLE001 - any exporter failure means "use torch"
        raise EngineUnavailableError(f"the ONNX export failed ({describe(error)})") from None
    network = _checked_session(graph, model, input_size, fixed_batch, threads)
    if path is not None:
        try:
            with atomic_path(path, suffix=".onnx") as temp:
                temp.write_bytes(graph)
        except OSError as error:
            log.debug("could not cache the ONNX graph at %s (%s)", path, error)
    return network
