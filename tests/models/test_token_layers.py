"""Token layers of transformers as CAM targets: the reshape follows the layer's output shape,
and the map equals grad-cam's own example (Swin ``norm2``, ``usage_examples/swinT_example.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xai_exp.app.hydra_app import compose_config
from xai_exp.data.images import bundled_images
from xai_exp.explain.cam import compute_cam
from xai_exp.models.architectures import ChannelsFirst, TokensToGrid, family_of, layer_reshape
from xai_exp.models.classifier import fit_to_input, load_classifier

SWIN = "swin_tiny_patch4_window7_224"


def swin_example_reshape(tensor: torch.Tensor, height: int = 7, width: int = 7) -> torch.Tensor:
    """grad-cam's usage_examples/swinT_example.py, verbatim."""
    result = tensor.reshape(tensor.size(0), height, width, tensor.size(2))
    result = result.transpose(2, 3).transpose(1, 2)
    return result


@pytest.fixture(scope="module")
def swin_norm2():
    torch.manual_seed(0)
    cfg = compose_config(
        [
            "model=timm",
            f"model.arch={SWIN}",
            "model.target_layer=layers.-1.blocks.-1.norm2",
            "model.weights=null",
        ]
    )
    return load_classifier(cfg.model, "cpu")


def test_swin_norm2_tokens_are_laid_on_their_grid(swin_norm2):
    assert swin_norm2.input_size == 224
    assert swin_norm2.reshape == TokensToGrid(0, (7, 7))
    tokens = torch.randn(1, 49, 5)
    assert torch.equal(swin_norm2.reshape(tokens), swin_example_reshape(tokens))


def test_swin_norm2_map_equals_grad_cams_swin_example(swin_norm2):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    image = fit_to_input(bundled_images(1)[0].image, 224)
    x = swin_norm2.input_tensor(image)
    ours = compute_cam(swin_norm2, x, "gradcam", 3, implementation="fast")
    cam = GradCAM(
        swin_norm2.model, [swin_norm2.target_layer], reshape_transform=swin_example_reshape
    )
    try:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(3)])[0]
    finally:
        cam.activations_and_grads.release()
    assert ours.shape == (224, 224)
    assert np.ptp(theirs) > 0  # a map, not a constant: the comparison means something
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_the_reshape_is_chosen_from_the_token_shape():
    import timm

    swin = family_of(
        timm.create_model(
            SWIN,
            pretrained=False,
            img_size=64,
            window_size=2,
            embed_dim=24,
            depths=(1, 1, 1, 1),
            num_heads=(1, 1, 1, 1),
        )
    )
    vit = family_of(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1))
    assert layer_reshape(swin, (1, 2, 2, 192)) == ChannelsFirst()  # norm1: B x H x W x C
    assert layer_reshape(swin, (1, 4, 192)) == TokensToGrid(0, (2, 2))  # norm2: B x H*W x C
    assert layer_reshape(swin, (1, 24, 16, 16)) is None  # the patch convolution: channels first
    assert layer_reshape(vit, (1, 197, 192)) == TokensToGrid(1, (14, 14))  # class token first
    assert layer_reshape(vit, (1, 196, 192)) == TokensToGrid(0, (14, 14))  # patch tokens only
    assert layer_reshape(vit, (1, 5, 192)) == vit.reshape  # no grid: refused by the dry pass
