"""timm models of every family, offline (random init, small inputs): default target layers,
transformer reshape transforms, refused methods, and the model's own preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import find_free_port
from torch import nn

from xai_exp.app.job import check_config
from xai_exp.cache import ExplanationCache
from xai_exp.config import ConfigError, LimeConfig, ModelConfig, StudyConfig
from xai_exp.data.images import ImageItem, bundled_images
from xai_exp.explain import cam as cam_module
from xai_exp.explain import lime, superpixels
from xai_exp.explain.cam import CAM_METHODS, cam_implementation, compute_cam
from xai_exp.models.architectures import FAMILY_LAYERS, TokensToGrid, family_of
from xai_exp.models.classifier import (
    ModelLoadError,
    fit_to_input,
    load_classifier,
    prepare_classifier,
)
from xai_exp.models.views import View
from xai_exp.study import pipeline, steps

SIZE = 64
SMALL = {  # family -> (timm name, arguments that keep it small at 64 px)
    "resnet": ("resnet10t", {}),
    "convnext": ("convnext_atto", {}),
    "vit": ("vit_tiny_patch16_224", {"depth": 2}),
    "deit": ("deit_tiny_distilled_patch16_224", {"depth": 2}),
    "swin": (
        "swin_tiny_patch4_window7_224",
        {"window_size": 2, "embed_dim": 24, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)},
    ),
}


def timm_config(family: str, **overrides) -> ModelConfig:
    arch, kwargs = SMALL[family]
    options = {"source": "timm", "arch": arch, "weights": None, "target_layer": None}
    options |= {"input_size": SIZE, "kwargs": kwargs} | overrides
    return ModelConfig(**options)


@pytest.fixture(scope="module", params=list(SMALL))
def classifier(request):
    return load_classifier(timm_config(request.param), "cpu")


def picture() -> np.ndarray:
    return fit_to_input(bundled_images(1)[0].image, SIZE)


def test_every_supported_cam_method_gives_a_map_of_the_input_size(classifier):
    expected = {"deit": "vit"}.get(classifier.arch)
    family = classifier.family
    assert classifier.target_layer_name == FAMILY_LAYERS[family.name]
    assert family.name == expected or family.name in FAMILY_LAYERS
    x = classifier.input_tensor(picture())
    refused = set(family.refusals())
    for method in CAM_METHODS:
        if method in refused:
            with pytest.raises(ConfigError, match=f"method={method} does not work on"):
                family.check_method(method)
            continue
        cam = compute_cam(classifier, x, method, 3, batch_size=64)
        assert cam.shape == (SIZE, SIZE), method
        assert np.isfinite(cam).all(), method


def test_lime_runs_on_every_family(classifier):
    image = picture()
    segments = superpixels.segment(image, "slic", {"n_segments": 12, "start_label": 0})
    explanation = lime.fast_lime(
        classifier, image, segments, 3, num_samples=24, hide_color=None, seed=0
    )
    assert explanation.weights.shape == (int(segments.max()) + 1,)
    assert np.isfinite(explanation.weights).all()


def test_transformers_get_their_reshape_and_cnns_none():
    vit = load_classifier(timm_config("vit"), "cpu")
    deit = load_classifier(timm_config("deit"), "cpu")
    swin = load_classifier(timm_config("swin"), "cpu")
    convnext = load_classifier(timm_config("convnext"), "cpu")
    assert vit.reshape == TokensToGrid(1, (4, 4))  # class token dropped, 64 / 16 = 4 patches
    assert deit.reshape == TokensToGrid(2, (4, 4))  # class and distillation tokens
    assert swin.reshape is not None
    assert convnext.reshape is None
    tokens = torch.arange(2 * 17 * 3, dtype=torch.float32).reshape(2, 17, 3)
    grid = vit.reshape(tokens)
    assert grid.shape == (2, 3, 4, 4)
    assert torch.equal(grid[:, :, 0, 1], tokens[:, 2, :])  # patch (0, 1) is token 1 + 1


class ToyViT(nn.Module):
    """Patch tokens behind a class token; the class score reads channel 0 of every patch
    token equally, so only the planted patch (bright in channel 0) can explain it."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 4, kernel_size=8, stride=8)
        self.patch_embed.grid_size = (4, 4)
        self.num_prefix_tokens = 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.blocks = nn.Sequential(nn.Module())
        self.blocks[0].norm1 = nn.Identity()
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.patch_embed.weight.zero_()
            self.patch_embed.bias.zero_()
            self.patch_embed.weight[0, 0] = 1.0 / 64  # channel 0: the patch's mean red
            self.head.weight.zero_()
            self.head.bias.zero_()
            self.head.weight[1, 0] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1)
        tokens = self.blocks[0].norm1(tokens)
        return self.head(torch.relu(tokens[:, 1:]).mean(dim=1))


def test_a_transformer_map_points_at_the_planted_patch():
    net = ToyViT()
    classifier = prepare_classifier(
        net, arch="toy-vit", target_layer=None, input_size=32, labels=["a", "b"]
    )
    assert classifier.target_layer_name == "blocks.-1.norm1"
    image = np.zeros((32, 32, 3), np.uint8)
    image[8:16, 16:24, 0] = 255  # patch (row 1, column 2) of the 4 x 4 grid
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    for method in ("gradcam", "scorecam"):
        cam = compute_cam(classifier, x, method, 1)
        row, col = np.unravel_index(np.argmax(cam), cam.shape)
        assert (row // 8, col // 8) == (1, 2), method
        assert cam[8:16, 16:24].mean() > 4 * cam[24:, :8].mean(), method


def test_methods_that_cannot_work_are_refused_before_compute():
    cfg = StudyConfig(model=timm_config("vit"))
    cfg.method.name = "ablationcam"
    with pytest.raises(ConfigError, match="method=ablationcam does not work on vit models"):
        check_config(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"arch": "vit_tiny_patch16_2244"}, "not a timm model; did you mean vit_tiny_patch16_224"),
        ({"weights": "IMAGENET1K_V1"}, "timm models take pretrained"),
        ({"kwargs": {"no_such_argument": 1}}, "model.kwargs"),
    ],
)
def test_timm_config_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_classifier(timm_config("convnext", **overrides), "cpu")


def test_preprocessing_comes_from_the_model_and_square_keeps_the_full_crop():
    vit = load_classifier(timm_config("vit"), "cpu")
    assert (vit.crop_fraction, vit.interpolation, vit.mean) == (0.9, "bicubic", (0.5,) * 3)
    square = load_classifier(timm_config("vit", preprocess="square"), "cpu")
    assert (square.crop_fraction, square.interpolation) == (1.0, "bicubic")
    assert square.mean == vit.mean  # normalisation is always the model's
    resnet = load_classifier(ModelConfig(arch="resnet18", weights=None, target_layer=None), "cpu")
    assert resnet.target_layer_name == "layer4.-1"
    assert (resnet.input_size, resnet.crop_fraction, resnet.interpolation) == (
        224,
        224 / 256,
        "bilinear",
    )  # torchvision's IMAGENET1K transforms: resize 256, crop 224
    assert (resnet.resize_size, resnet.crop_mode, square.crop_mode) == (256, "center", "square")
    assert (vit.resize_size, vit.crop_mode) == (71, "center")  # timm: floor(64 / 0.9)


def test_the_models_view_reaches_both_explanation_paths(tmp_path, monkeypatch):
    classifier = load_classifier(timm_config("convnext"), "cpu")
    classifier.crop_fraction, classifier.interpolation = 0.5, "bilinear"
    classifier.resize_size, classifier.crop_mode = 2 * SIZE, "center"
    image = np.asarray(bundled_images(1)[0].image)
    expected = View(SIZE, 2 * SIZE, "bilinear", "center").image(image)
    seen = {}
    real_cam, real_segment = cam_module.compute_cam, steps.segment

    def spy_cam(model, tensor, *args, **kwargs):
        seen["cam"] = tensor
        return real_cam(model, tensor, *args, **kwargs)

    def spy_segment(view, *args):
        seen["lime"] = view
        return real_segment(view, *args)

    monkeypatch.setattr(cam_module, "compute_cam", spy_cam)  # imported when a map is computed
    monkeypatch.setattr(steps, "segment", spy_segment)
    lime_config = LimeConfig(num_samples=20)
    lime_config.segmentation.algorithm = "slic"
    lime_config.segmentation.params = {"n_segments": 12, "start_label": 0}
    study = pipeline.Study(StudyConfig(lime=lime_config), classifier, ExplanationCache(tmp_path))
    [result] = pipeline.run_study(study, [ImageItem("a", "a", image, "h", "a")], progress=False)
    assert np.array_equal(result.arrays["image"], expected)
    assert np.array_equal(seen["lime"], expected)
    assert torch.equal(seen["cam"], classifier.input_tensor(expected))
    assert not np.array_equal(expected, fit_to_input(image, SIZE))  # another view than square


def test_family_defaults_cover_torchvision_and_unknown_models():
    import torchvision

    assert family_of(torchvision.models.resnet18()).target_layer == "layer4.-1"
    assert family_of(torchvision.models.vgg11()).target_layer == "features.-1"

    class Bare(nn.Module):
        def forward(self, x):
            return x.mean((2, 3))

    with pytest.raises(ConfigError, match=r"no default for Bare; set model\.target_layer"):
        prepare_classifier(Bare(), arch="bare", target_layer=None, input_size=8, labels=["a"])


@pytest.mark.parametrize("family", ["vit", "swin", "convnext"])
def test_fast_score_cam_equals_grad_cams_class_on_timm_models(family):
    classifier = load_classifier(timm_config(family), "cpu")
    x = classifier.input_tensor(picture())
    fast = compute_cam(classifier, x, "scorecam", 3, batch_size=64, implementation="fast")
    reference = compute_cam(classifier, x, "scorecam", 3, batch_size=64, implementation="reference")
    assert cam_implementation(classifier, "scorecam", "fast") == "fast"
    assert np.abs(fast - reference).max() <= 1e-4


def test_pretrained_weights_that_cannot_be_fetched_say_what_to_do(monkeypatch):
    import timm

    def offline(*_args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        raise AssertionError("only the download fails")

    from huggingface_hub import constants

    from xai_exp.models import hub

    monkeypatch.setattr(timm, "create_model", offline)
    # the hub probe stays on this machine: a closed local port stands for the hub
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{find_free_port()}")
    hub.unreachable_hub.cache_clear()
    try:
        with pytest.raises(ModelLoadError, match=r"offline\? use model\.weights=null"):
            load_classifier(timm_config("convnext", weights="pretrained"), "cpu")
    finally:
        hub.unreachable_hub.cache_clear()
