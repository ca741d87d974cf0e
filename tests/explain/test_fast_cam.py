"""Fast Score-CAM / Ablation-CAM paths give grad-cam's maps (small inputs, random-init nets)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from xai_exp.explain import cam, fast_cam
from xai_exp.models import inference
from xai_exp.models.classifier import prepare_classifier

SIZE = 64
TOL = 1e-4
LABELS = [str(i) for i in range(1000)]


def _randomise_batchnorm(net: nn.Module, seed: int) -> nn.Module:
    """Non-trivial running statistics, so BatchNorm folding is really exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
    return net


def tiny_resnet(seed: int = 0) -> nn.Module:
    """A ResNet with one BasicBlock per stage (torchvision's own classes), 10 classes."""
    torch.manual_seed(seed)
    return _randomise_batchnorm(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10), seed)


def wrap(net: nn.Module, layer: str, size: int = SIZE):
    return prepare_classifier(net, arch="test", target_layer=layer, input_size=size, labels=LABELS)


def image(seed: int = 0, size: int = SIZE) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return wrap(torchvision.models.resnet18(weights=None), "layer4.-1")


@pytest.fixture(scope="module")
def tiny():
    return wrap(tiny_resnet(), "layer4.-1")


def assert_same(reference: np.ndarray, ours: np.ndarray) -> None:
    assert ours.shape == reference.shape
    assert ours.dtype == np.float32
    assert np.abs(ours - reference).max() <= TOL


def test_ablation_matches_grad_cam_resnet18(resnet18):
    x = image(1)
    assert fast_cam.supports(resnet18, "ablationcam")
    reference = cam.reference_cam(resnet18, x, "ablationcam", 7, batch_size=64)
    assert_same(reference, fast_cam.fast_ablation_cam(resnet18, x, 7, 64))


@pytest.mark.parametrize("layer", ["bn2", "conv_head"])
def test_ablation_matches_grad_cam_timm_efficientnet(layer):
    import timm

    torch.manual_seed(0)
    net = _randomise_batchnorm(timm.create_model("tf_efficientnet_lite0", pretrained=False), 0)
    classifier = wrap(
        net, layer, size=64
    )  # a 2 x 2 feature map: a 1 x 1 map is refused (constant CAM)
    x = image(3, size=64)
    assert fast_cam.supports(classifier, "ablationcam")
    reference = cam.reference_cam(classifier, x, "ablationcam", 5, batch_size=256)
    assert_same(reference, cam.compute_cam(classifier, x, "ablationcam", 5, 256, "fast"))


@pytest.mark.parametrize("layer", ["layer4", "layer3.0"])
def test_ablation_matches_grad_cam_other_targets(layer):
    classifier = wrap(tiny_resnet(1), layer)
    x = image(2)
    reference = cam.reference_cam(classifier, x, "ablationcam", 3, batch_size=32)
    assert_same(reference, cam.compute_cam(classifier, x, "ablationcam", 3, 32, "fast"))


@pytest.mark.parametrize("batch_size", [32, 7])
def test_ablation_negative_activations_replicates_ablation_layer(batch_size):
    """Target outputs with a non-zero minimum: AblationLayer writes min - (i+1)*1e7 per batch
    position i, so the map depends on the batch size; we must follow it."""
    net = tiny_resnet(2)
    net.layer4[-1].relu = nn.Identity()  # the block's output can now be negative
    classifier = wrap(net, "layer4.-1")
    x = image(3)
    reference = cam.reference_cam(classifier, x, "ablationcam", 5, batch_size=batch_size)
    assert_same(reference, fast_cam.fast_ablation_cam(classifier, x, 5, batch_size))


def test_ablation_values_follow_batch_positions():
    activations = torch.tensor([[[-1.0]], [[2.0]], [[3.0]]])
    values = fast_cam.ablation_values(activations, 3, batch_size=2)
    expected = torch.tensor([-1.0 - 1e7, -1.0 - 2e7, -1.0 - 1e7])
    assert torch.equal(values, expected)
    assert torch.equal(fast_cam.ablation_values(activations.clamp(min=0), 3, 2), torch.zeros(3))


def test_score_cam_matches_grad_cam_resnet18(resnet18):
    x = image(4)
    reference = cam.reference_cam(resnet18, x, "scorecam", 11, batch_size=128)
    assert_same(reference, cam.compute_cam(resnet18, x, "scorecam", 11, 128, "fast"))


def test_score_cam_duplicate_masks_skipped_exactly():
    net = tiny_resnet(3)
    block = net.layer4[-1]
    with torch.no_grad():  # channels 0..99 of the target output become all-zero after ReLU
        for bn in (block.bn2, block.downsample[1]):
            bn.weight[:100] = 0
            bn.bias[:100] = -1
    classifier = wrap(net, "layer4.-1")
    x = image(5)
    activations, _ = fast_cam._activations_and_logits(classifier, x, "fp32")
    representative = fast_cam.unique_masks(activations[0], (SIZE, SIZE))
    assert len(set(representative)) <= activations.shape[1] - 99
    assert all(representative[c] == 0 for c in range(100))
    skipped = fast_cam.fast_score_cam(classifier, x, 2, 64)
    full = fast_cam.fast_score_cam(classifier, x, 2, 64, skip_duplicates=False)
    assert np.abs(skipped - full).max() <= 1e-6
    assert_same(cam.reference_cam(classifier, x, "scorecam", 2, batch_size=64), skipped)


def test_score_cam_batch_size_invariant(tiny):
    x = image(6)
    maps = [fast_cam.fast_score_cam(tiny, x, 4, batch_size) for batch_size in (3, 50, 512)]
    for other in maps[1:]:
        assert np.abs(other - maps[0]).max() <= 1e-5


def test_fallback_for_non_separable_model():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    classifier = wrap(net, "3", size=32)
    assert not fast_cam.supports(classifier, "ablationcam")
    x = image(7, size=32)
    reference = cam.reference_cam(classifier, x, "ablationcam", 1, batch_size=8)
    assert np.array_equal(cam.compute_cam(classifier, x, "ablationcam", 1, 8, "fast"), reference)
    # Score-CAM needs no separable tail
    assert fast_cam.supports(classifier, "scorecam")
    assert_same(
        cam.reference_cam(classifier, x, "scorecam", 1, batch_size=8),
        cam.compute_cam(classifier, x, "scorecam", 1, 8, "fast"),
    )


def test_no_fast_ablation_for_resnet_with_custom_forward():
    class Custom(ResNet):
        def forward(self, x):
            return super().forward(x) * 2

    torch.manual_seed(0)
    classifier = wrap(Custom(BasicBlock, [1, 1, 1, 1], num_classes=10), "layer4.-1")
    assert not fast_cam.supports(classifier, "ablationcam")
    assert not fast_cam.supports(classifier, "gradcam")


def test_inference_copy_is_folded_and_leaves_model_alone(tiny):
    inference.prepare_for_inference(tiny)
    network = inference.inference_network(tiny)
    assert network is not tiny.model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in network.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in tiny.model.modules())
    x = image(8).repeat(3, 1, 1, 1)
    with torch.inference_mode():
        expected = tiny.model(x)
    logits = inference.forward_logits(tiny, x, "fp32")
    assert torch.allclose(logits, expected, rtol=1e-4, atol=1e-4)
    # weights changed in place: the copy is rebuilt
    with torch.no_grad():
        tiny.model.fc.bias.add_(1.0)
    try:
        logits = inference.forward_logits(tiny, x, "fp32")
        assert torch.allclose(logits, expected + 1.0, rtol=1e-4, atol=1e-4)
    finally:
        with torch.no_grad():
            tiny.model.fc.bias.sub_(1.0)


def test_bf16_precision_runs():
    small = wrap(tiny_resnet(4), "layer3", size=32)  # bf16 is slow on CPUs without AMX
    x = image(9, size=32)
    fp32 = fast_cam.fast_score_cam(small, x, 1, 256, precision="fp32")
    bf16 = fast_cam.fast_score_cam(small, x, 1, 256, precision="bf16")
    ablation = fast_cam.fast_ablation_cam(small, x, 1, 32, precision="bf16")
    for result in (bf16, ablation):
        assert result.shape == fp32.shape
        assert np.isfinite(result).all()
    with pytest.raises(ValueError, match="precision"):
        inference.forward_logits(small, x, "fp16")
