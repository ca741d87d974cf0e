"""The explained view equals the model's own eval transform pixel for pixel: timm's
`create_transform(**resolve_data_config(...))` and torchvision's `weights.transforms()`, run
themselves on PIL images of odd sizes; the object mask goes through the same geometry."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torchvision.transforms import functional as tvf

from xai_exp.models.classifier import (
    Preprocessing,
    _bundled_efficientnet,
    timm_preprocessing,
    torchvision_preprocessing,
)
from xai_exp.models.views import CENTER, SQUARE, SQUASH, View, fit_mask_to_input, fit_to_input

# (width, height): odd aspect ratios, tall and wide, 1-pixel strips, exact squares, smaller
# than the crop; 367x256 is cut at column 72 by CenterCrop (71 when the offset is floored)
SIZES = [(367, 256), (376, 263), (256, 367), (1, 1000), (1000, 1), (300, 300), (224, 224)]
SIZES += [(100, 80), (235, 500), (249, 251)]


def noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth-ish random RGB: every resampling or offset difference shows in the pixels."""
    rng = np.random.default_rng(seed + width * 7919 + height)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


@functools.cache
def timm_net(arch: str, **overlay: object) -> torch.nn.Module:
    if arch == "bundled":
        return _bundled_efficientnet()
    return timm.create_model(arch, pretrained=False, pretrained_cfg_overlay=overlay or None)


TIMM = {  # name -> (arch, pretrained config overlay), with the crop each one has
    "resnet18 (crop 0.95)": ("resnet18", {}),
    "vit (crop 0.9)": ("vit_tiny_patch16_224", {}),
    "tf_efficientnet_lite0 (crop 0.875)": ("tf_efficientnet_lite0", {}),
    "bundled EfficientNet-Lite0": ("bundled", {}),
    "squash (crop 0.9)": ("resnet18", {"crop_pct": 0.9, "crop_mode": "squash"}),
    "crop 1.15: pads": ("resnet18", {"crop_pct": 1.15, "interpolation": "bilinear"}),
}


def timm_case(name: str, input_size: int | None = None) -> tuple[Preprocessing, object, dict]:
    arch, overlay = TIMM[name]
    net = timm_net(arch, **overlay)
    own = timm_preprocessing(net, input_size)
    args = {} if input_size is None else {"input_size": (3, input_size, input_size)}
    config = resolve_data_config(args, model=net)
    return own, create_transform(**config), config


def pil_steps(transform: object, pil: Image.Image) -> np.ndarray:
    """The library transform up to (not including) its tensor conversion and normalisation."""
    for step in transform.transforms:
        if type(step).__name__ in ("MaybeToTensor", "ToTensor", "Normalize"):
            break
        pil = step(pil)
    return np.asarray(pil)


def view_of(own: Preprocessing) -> View:
    return View(own.input_size, own.resize_size, own.interpolation, own.crop_mode)


def test_the_timm_cases_are_the_configs_the_issue_names():
    expected = {
        "resnet18 (crop 0.95)": (0.95, 235, CENTER, "bicubic"),
        "vit (crop 0.9)": (0.9, 248, CENTER, "bicubic"),
        "tf_efficientnet_lite0 (crop 0.875)": (0.875, 256, CENTER, "bicubic"),
        "bundled EfficientNet-Lite0": (0.875, 256, CENTER, "bicubic"),
        "squash (crop 0.9)": (0.9, 248, SQUASH, "bicubic"),
        "crop 1.15: pads": (1.15, 194, CENTER, "bilinear"),
    }
    for name, (crop, resize, mode, interpolation) in expected.items():
        own, _, _ = timm_case(name)
        assert (own.crop_fraction, own.resize_size, own.crop_mode) == (crop, resize, mode), name
        assert (own.input_size, own.interpolation) == (224, interpolation), name


@pytest.mark.parametrize("name", list(TIMM))
def test_the_view_is_timms_eval_transform_pixel_for_pixel(name):
    own, transform, _ = timm_case(name)
    view = view_of(own)
    for width, height in SIZES:
        image = noise(width, height)
        expected = pil_steps(transform, Image.fromarray(image))
        assert expected.shape == (224, 224, 3)
        assert np.array_equal(view.image(image), expected), (name, width, height)


@pytest.mark.parametrize("name", ["resnet18 (crop 0.95)", "vit (crop 0.9)"])
def test_at_another_input_size_the_view_is_timms_transform_at_that_size(name):
    own, transform, config = timm_case(name, 97)
    assert config["input_size"] == (3, 97, 97)
    for width, height in [(367, 256), (376, 263), (1, 1000), (50, 60)]:
        image = noise(width, height, 1)
        expected = pil_steps(transform, Image.fromarray(image))
        assert np.array_equal(view_of(own).image(image), expected), (name, width, height)


@pytest.mark.parametrize("name", ["resnet18 (crop 0.95)", "squash (crop 0.9)", "crop 1.15: pads"])
def test_the_object_mask_goes_through_the_same_geometry(name):
    own, _, config = timm_case(name)
    nearest = create_transform(**{**config, "interpolation": "nearest"})
    rng = np.random.default_rng(3)
    for width, height in [(367, 256), (256, 367), (1000, 1), (100, 80)]:
        mask = rng.random((height, width)) > 0.5
        expected = pil_steps(nearest, Image.fromarray(mask.astype(np.uint8) * 255)) > 127
        assert np.array_equal(view_of(own).mask(mask), expected), (name, width, height)


def torchvision_expected(weights: object, image: np.ndarray) -> torch.Tensor:
    return weights.transforms()(Image.fromarray(image))


def normalised(view: np.ndarray, weights: object) -> torch.Tensor:
    """The view through the weights' own tensor conversion and normalisation."""
    preset = weights.transforms()
    tensor = tvf.convert_image_dtype(torch.from_numpy(view).permute(2, 0, 1), torch.float)
    return tvf.normalize(tensor, mean=preset.mean, std=preset.std)


@pytest.mark.parametrize(
    ("arch", "weights"),
    [
        ("resnet18", torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
        ("resnet18", None),  # random init: the default weights' transforms
        ("efficientnet_b1", torchvision.models.EfficientNet_B1_Weights.IMAGENET1K_V2),
    ],
)
def test_the_view_is_the_torchvision_weights_transforms_pixel_for_pixel(arch, weights):
    own = torchvision_preprocessing(arch, weights)
    reference = weights or torchvision.models.ResNet18_Weights.DEFAULT
    preset = reference.transforms()
    assert (own.input_size, own.resize_size) == (preset.crop_size[0], preset.resize_size[0])
    assert own.interpolation == preset.interpolation.value
    for width, height in SIZES:
        image = noise(width, height, 2)
        # equal tensors after the same conversion: equal uint8 pixels
        expected = torchvision_expected(reference, image)
        assert torch.equal(normalised(view_of(own).image(image), reference), expected), (
            arch,
            width,
            height,
        )


def test_resnet18_torchvision_view_is_resize_256_crop_224_bilinear():
    own = torchvision_preprocessing("resnet18", None)
    assert (own.input_size, own.resize_size, own.interpolation, own.crop_mode) == (
        224,
        256,
        "bilinear",
        CENTER,
    )
    assert torchvision_preprocessing("resnet18", None, 160).resize_size == 182  # 160 / 0.875


def test_the_issues_rounding_cases():
    # timm floors the resize (235, not 236, at 0.95); torchvision truncates the long side
    # (goldfish 376x263 at 256: 365 wide, not 366); CenterCrop rounds (367x256: column 72)
    assert timm_case("resnet18 (crop 0.95)")[0].resize_size == 235
    from xai_exp.models.views import center_crop, resized_size

    assert resized_size(376, 263, 256) == (365, 256)
    image = np.tile(np.arange(367, dtype=np.uint16)[None, :, None], (256, 1, 3))
    index = Image.fromarray((image % 256).astype(np.uint8))
    cropped = np.asarray(center_crop(index, 224))
    assert cropped[0, 0, 0] == 72  # (367 - 224) / 2 = 71.5 rounds to 72 (half to even)


def old_square(image: np.ndarray, size: int) -> np.ndarray:
    """The full centre square as it was before the model's view went pixel-exact."""
    pil = Image.fromarray(image)
    width, height = pil.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    pil = pil.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(pil.crop((left, top, left + size, top + size)))


def test_square_keeps_its_pixels_and_so_its_cache_keys():
    for width, height in SIZES:
        image = noise(width, height, 4)
        square = View(224, 224, "bicubic", SQUARE).image(image)
        assert np.array_equal(square, old_square(image, 224)), (width, height)
        assert np.array_equal(fit_to_input(image, 224), square)
    mask = np.zeros((256, 367), dtype=bool)
    mask[:, 183:] = True  # the right half: the right half of the square (column 72 is cut)
    fitted = fit_mask_to_input(mask, 224)
    assert fitted.shape == (224, 224)
    assert 0.45 < fitted.mean() < 0.55


def test_a_crop_mode_xai_exp_cannot_view_is_refused():
    with pytest.raises(ValueError, match="crop mode 'border'"):
        View(224, 224, "bicubic", "border")


def test_the_models_view_changes_the_cache_keys_and_square_keeps_them(tmp_path):
    from xai_exp.cache import ExplanationCache
    from xai_exp.config import StudyConfig
    from xai_exp.data.images import ImageItem
    from xai_exp.models.facts import DeferredClassifier, ModelFacts
    from xai_exp.study.pipeline import Study

    def base_key(**view: object) -> dict:
        facts = ModelFacts(
            arch="a", identity="a:0", input_size=224, labels=["x"], mean=(0.5,) * 3,
            std=(0.5,) * 3, crop_fraction=1.0, interpolation="bicubic",
            target_layer_name="l", family=None, device="cpu", engine="torch", **view,
        )  # fmt: skip
        deferred = DeferredClassifier(facts, lambda: (_ for _ in ()).throw(AssertionError()))
        study = Study(StudyConfig(device="cpu"), deferred, ExplanationCache(tmp_path))
        return study._base_key(ImageItem("a", "a", noise(2, 2), "h", None))

    assert "view" not in base_key()  # the full bicubic square: the keys from before
    assert "view" not in base_key(crop_mode="square", resize_size=224)
    # a timm model with crop_pct 1.0: once keyed like the square, now its own view (version 2)
    assert base_key(crop_mode="center", resize_size=224)["view"] == ["center", 224, "bicubic", 2]
    assert base_key(crop_mode="squash", resize_size=248)["view"] == ["squash", 248, "bicubic", 2]


@pytest.mark.parametrize(
    "model",
    [
        {},  # the default: the bundled EfficientNet-Lite0 (timm's tf_efficientnet_lite0)
        {"arch": "resnet18", "weights": None, "target_layer": None, "input_size": None},
    ],
    ids=["bundled", "torchvision-resnet18"],
)
def test_the_studys_view_and_input_are_the_libraries_transform(model):
    """Through load_classifier and the cached facts: the view a study explains and draws on,
    and the tensor the model sees, are the library's own transform of the image."""
    from xai_exp.config import ModelConfig
    from xai_exp.models.classifier import load_classifier
    from xai_exp.models.facts import DeferredClassifier, ModelFacts

    classifier = load_classifier(ModelConfig(**model), "cpu")
    facts = ModelFacts.from_meta(DeferredClassifier.ready(classifier, "torch").facts.to_meta())
    if model:
        transform = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    else:
        transform = create_transform(**resolve_data_config({}, model=classifier.model))
    for width, height in [(367, 256), (376, 263), (1, 1000)]:
        image = noise(width, height, 5)
        view = facts.view(image)
        expected = transform(Image.fromarray(image))
        if not model:
            assert np.array_equal(view, pil_steps(transform, Image.fromarray(image)))
        torch.testing.assert_close(classifier.input_tensor(view)[0], expected, rtol=0, atol=1e-5)
