"""Exact fast paths for the forward-pass-heavy CAM methods (filled in by the performance work)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from xai_exp.models import Classifier

FastCam = Callable[[Classifier, torch.Tensor, int, int], np.ndarray]
FAST_METHODS: dict[str, FastCam] = {}


def supports(classifier: Classifier, method: str) -> bool:
    """Whether the fast path for `method` applies to this model."""
    return False
