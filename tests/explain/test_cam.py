"""CAM maps: our wrapper gives exactly what grad-cam's own classes give on the same input."""

import numpy as np
import pytest
import pytorch_grad_cam
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from tiny_models import smooth_image, tiny_classifier

from xai_exp.config import ConfigError
from xai_exp.explain.cam import CAM_METHODS, check_method, compute_cam, reference_cam

DETERMINISTIC = [name for name in CAM_METHODS if name != "randomcam"]


@pytest.fixture(scope="module")
def classifier():
    return tiny_classifier(seed=1)


@pytest.mark.parametrize("method", DETERMINISTIC)
def test_reference_cam_equals_grad_cam(classifier, method):
    tensor = classifier.input_tensor(smooth_image())
    ours = compute_cam(classifier, tensor, method, target_class=3, implementation="reference")
    cam_class = getattr(pytorch_grad_cam, CAM_METHODS[method])
    with cam_class(classifier.model, [classifier.target_layer]) as cam:
        if method == "scorecam":
            cam.batch_size = 32
        theirs = cam(input_tensor=tensor, targets=[ClassifierOutputTarget(3)])[0]
    assert ours.shape == (32, 32)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_target_class_changes_the_map(classifier):
    tensor = classifier.input_tensor(smooth_image(seed=2))
    maps = [reference_cam(classifier, tensor, "gradcam", target) for target in range(4)]
    assert any(not np.allclose(maps[0], other) for other in maps[1:])


def test_grad_cam_progress_bars_are_silenced(classifier, capsys):
    tensor = classifier.input_tensor(smooth_image())
    reference_cam(classifier, tensor, "scorecam", 0)
    reference_cam(classifier, tensor, "ablationcam", 0)
    captured = capsys.readouterr()
    assert "it/s" not in captured.err + captured.out
    assert "%|" not in captured.err + captured.out


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(ConfigError, match="available: gradcam, hirescam"):
        check_method("nosuch")
