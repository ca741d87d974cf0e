"""Tiny CNNs and images shared by the unit tests (CPU, milliseconds per forward pass)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from xai_exp.config import LimeConfig, MethodConfig, StudyConfig, ThresholdConfig
from xai_exp.data.images import ImageItem
from xai_exp.models.classifier import Classifier, prepare_classifier


class TinyCNN(nn.Module):
    """conv-relu-conv-relu (target layer `features.3`) -> global average pool -> linear."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, stride=2),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def bn_cnn() -> nn.Module:
    """Seeded conv-BN-ReLU with non-trivial running statistics (target layer `3`): its
    probabilities vary with the input, and its BatchNorm is there to fold."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 1.5)
    return net


def tiny_classifier(seed: int = 0, size: int = 32, classes: int = 10) -> Classifier:
    """A seeded TinyCNN wrapped as a Classifier."""
    torch.manual_seed(seed)
    return prepare_classifier(
        TinyCNN(classes),
        arch=f"tiny-{seed}",
        target_layer="features.3",
        input_size=size,
        labels=[f"class{i}" for i in range(classes)],
    )


def smooth_image(size: int = 32, seed: int = 0) -> np.ndarray:
    """A blocky random RGB image: structured enough for superpixels."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return np.kron(blocks, np.ones((size // 4, size // 4, 1), dtype=np.uint8))


def smooth_item(name: str, seed: int) -> ImageItem:
    return ImageItem(name, name, smooth_image(seed=seed), f"hash-{name}", name)


def smooth_study_config(fraction: float = 0.1, **lime) -> StudyConfig:
    # hidden superpixels black: on these smooth images a mean-colour superpixel hides nothing,
    # and LIME's weights would be ~1e-32 (flagged as all zero)
    lime_cfg = LimeConfig(num_samples=40, batch_size=16, **{"hide_color": 0, **lime})
    lime_cfg.segmentation.algorithm = "slic"
    lime_cfg.segmentation.params = {"n_segments": 16, "compactness": 10, "start_label": 0}
    return StudyConfig(
        method=MethodConfig(name="gradcam"),
        threshold=ThresholdConfig(cam_top_fraction=fraction),
        lime=lime_cfg,
        progress=False,
    )


SMOOTH_ITEMS = [
    smooth_item("a", 2),
    smooth_item("b", 6),
]  # both with positive LIME superpixels for seeds 0-2
