"""How well a saliency map points at the annotated object (ground truth), on toy-checkable maps.

`saliency` is an HxW map (a CAM, or LIME's signed per-pixel weights), `target` an HxW boolean
object mask at the same resolution. Definitions follow Quantus (pointing game, relevance mass
accuracy) and Score-CAM (energy-based pointing game).
"""

from __future__ import annotations

import numpy as np


def pointing_game(saliency: np.ndarray, target: np.ndarray) -> bool:
    """Quantus's pointing game: whether a maximum of the map lies inside the object."""
    peaks = saliency == saliency.max()
    return bool(np.any(peaks & target))


def energy_pointing_game(saliency: np.ndarray, target: np.ndarray) -> float | None:
    """Score-CAM's energy-based pointing game: the share of the map's positive energy inside
    the object (None when the map has no positive value)."""
    energy = np.clip(saliency.astype(np.float64), 0.0, None)
    total = float(energy.sum())
    return None if total <= 0.0 else float(energy[target].sum()) / total


def relevance_mass(saliency: np.ndarray, target: np.ndarray) -> float | None:
    """Quantus's relevance mass accuracy (abs=False): the map's sum inside the object over its
    total sum (None when the total is 0). Signed maps can give values outside 0..1."""
    values = saliency.astype(np.float64)
    total = float(values.sum())
    return None if total == 0.0 else float(values[target].sum()) / total
