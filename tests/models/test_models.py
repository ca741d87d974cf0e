"""Models: the bundled offline classifier, torchvision models, layers, checkpoints."""

import numpy as np
import pytest
import torch
import torchvision

from xai_exp.config import ConfigError, ModelConfig
from xai_exp.data.images import bundled_images
from xai_exp.models.classifier import ModelLoadError, fit_to_input, load_classifier, resolve_layer


@pytest.fixture(scope="module")
def bundled():
    return load_classifier(ModelConfig(), "cpu")


def test_bundled_model_recognises_cat_and_espresso(bundled):
    predict = bundled.predict
    names = {item.name: item for item in bundled_images()}
    cat = predict(fit_to_input(names["chelsea"].image, 224))[0]
    coffee = predict(fit_to_input(names["coffee"].image, 224))[0]
    assert "cat" in bundled.label(int(cat.argmax()))
    assert bundled.label(int(coffee.argmax())) == "espresso"
    assert len(bundled.labels) == 1000


def test_resolve_layer_accepts_negative_indices():
    net = torchvision.models.resnet18(weights=None)
    assert resolve_layer(net, "layer4.-1") is net.layer4[1]
    assert resolve_layer(net, "layer4.0.conv1") is net.layer4[0].conv1


def test_bad_target_layer_suggests_close_names():
    net = torchvision.models.resnet18(weights=None)
    with pytest.raises(ConfigError, match=r"did you mean.*layer4") as caught:
        resolve_layer(net, "layer5.-1")
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="out of range"):
        resolve_layer(net, "layer4.7")


def test_random_init_is_reproducible_and_identified_by_weights():
    cfg = ModelConfig(arch="resnet18", weights=None, target_layer="layer4.-1")
    first, second = load_classifier(cfg, "cpu"), load_classifier(cfg, "cpu")
    assert first.identity == second.identity
    assert first.identity.startswith("resnet18:")


def test_checkpoint_loads_weights_only(tmp_path):
    torch.manual_seed(3)
    net = torchvision.models.resnet18(weights=None)
    path = tmp_path / "weights.pt"
    torch.save(net.state_dict(), path)
    cfg = ModelConfig(arch="resnet18", weights=None, target_layer="layer4.-1", checkpoint=str(path))
    loaded = load_classifier(cfg, "cpu")
    np.testing.assert_array_equal(
        loaded.model.fc.weight.detach().numpy(), net.fc.weight.detach().numpy()
    )


def test_checkpoint_errors_are_one_line(tmp_path):
    missing = ModelConfig(arch="resnet18", weights=None, checkpoint=str(tmp_path / "nope.pt"))
    with pytest.raises(ConfigError, match="file not found"):
        load_classifier(missing, "cpu")
    wrong = tmp_path / "wrong.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(ModelLoadError, match="does not fit") as caught:
        load_classifier(ModelConfig(arch="resnet18", weights=None, checkpoint=str(wrong)), "cpu")
    assert "\n" not in str(caught.value)


def test_unknown_arch_and_weights_are_config_errors():
    with pytest.raises(ConfigError, match=r"did you mean.*resnet18"):
        load_classifier(ModelConfig(arch="resnet1", weights=None), "cpu")
    with pytest.raises(ConfigError, match="IMAGENET1K_V1"):
        load_classifier(ModelConfig(arch="resnet18", weights="NOPE", target_layer="layer4"), "cpu")


def test_offline_download_failure_names_checkpoint_and_default(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    cfg = ModelConfig(arch="resnet18", weights="IMAGENET1K_V1", target_layer="layer4.-1")
    with pytest.raises(
        ModelLoadError, match=r"model\.checkpoint=PATH.*model=efficientnet_lite0"
    ) as e:
        load_classifier(cfg, "cpu")
    assert "model.weights=null" in str(e.value)  # what the README recommends offline
    assert "network is unreachable" in str(e.value)
    assert "\n" not in str(e.value)


def test_fit_to_input_handles_tiny_and_wide_images():
    assert fit_to_input(np.zeros((1, 1, 3), np.uint8), 32).shape == (32, 32, 3)
    wide = fit_to_input(np.zeros((10, 300, 3), np.uint8), 64)
    assert wide.shape == (64, 64, 3)
    assert wide.dtype == np.uint8
