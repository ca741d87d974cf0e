"""Model-parameter randomisation check (Adebayo et al., 2018, cascading from the output layer).

The model's parameterised layers are re-initialised one after another, from the output layer
towards the input, on a deep copy; after each step the map is recomputed and compared with the
original map by Spearman rank correlation. A map that barely changes when the weights it should
explain are destroyed fails the check.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from xai_exp.agreement import rank_correlation
from xai_exp.masks import DegenerateMapError, check_map
from xai_exp.models import Classifier, resolve_layer


@dataclass
class RandomisationResult:
    """Spearman correlation with the original map after each cascading randomisation step."""

    correlations: list[tuple[str, float]]  # (module name randomised at this step, rho)
    final_correlation: float
    threshold: float
    passed: bool  # |final_correlation| < threshold


def parameterised_layers(model: nn.Module) -> list[str]:
    """Names of modules holding parameters of their own, output side first.

    Reverse `named_modules` order (registration order, reversed), which for sequential
    networks is the reverse of the forward order. The root is listed as "" if it owns any.
    """
    return [
        name
        for name, module in reversed(list(model.named_modules()))
        if any(True for _ in module.parameters(recurse=False))
    ]


def _randomise(module: nn.Module) -> None:
    """Re-initialise a module's own parameters.

    A leaf module uses its `reset_parameters()` (BatchNorm also resets its running statistics);
    otherwise each own parameter is redrawn from N(0, its current std), 0.02 if that is zero.
    """
    with torch.no_grad():
        has_children = any(True for _ in module.children())
        reset = getattr(module, "reset_parameters", None)
        if not has_children and callable(reset):
            reset()
            return
        for parameter in module.parameters(recurse=False):
            std = float(parameter.float().std()) if parameter.numel() > 1 else 0.0
            parameter.normal_(0.0, std if math.isfinite(std) and std > 0 else 0.02)


def _correlation(original: np.ndarray, randomised: np.ndarray) -> float:
    """Spearman rho; a randomised map that became constant keeps none of the order: 0."""
    try:
        return rank_correlation(original, randomised)
    except DegenerateMapError:
        if not np.all(np.isfinite(randomised)):
            raise
        return 0.0


def randomisation_check(
    classifier: Classifier,
    explain: Callable[[Classifier], np.ndarray],
    layers: int | None = None,
    threshold: float = 0.5,
    seed: int = 0,
) -> RandomisationResult:
    """Cascading model-parameter randomisation of `explain` (a map for a given classifier).

    `layers` caps the number of steps (None: every parameterised layer). Step i re-initialises
    one more layer under `torch.manual_seed(seed + i)` inside a forked RNG, so results are
    deterministic and the caller's RNG state is untouched. The original classifier is never
    modified; `explain` receives a copy whose `target_layer` is the copy's module and whose
    `identity` names the randomisation (so caches keyed on it do not return original maps).
    A constant original map raises DegenerateMapError.
    """
    if layers is not None and layers < 1:
        raise ValueError(f"layers must be at least 1 or None, got {layers}")
    original = np.asarray(explain(classifier), dtype=np.float64)
    check_map(original, "original map")
    names = parameterised_layers(classifier.model)
    if not names:
        raise ValueError("the model has no parameters to randomise")
    names = names[:layers] if layers is not None else names

    model = copy.deepcopy(classifier.model)
    modules = dict(model.named_modules())
    devices = [classifier.device] if classifier.device.type == "cuda" else []
    correlations: list[tuple[str, float]] = []
    for step, name in enumerate(names):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed + step)
            _randomise(modules[name])
        randomised = dataclasses.replace(
            classifier,
            model=model,
            target_layer=resolve_layer(model, classifier.target_layer_name),
            identity=f"{classifier.identity}+randomised(seed={seed},top={step + 1})",
        )
        rho = _correlation(original, np.asarray(explain(randomised), dtype=np.float64))
        correlations.append((name or "<root>", rho))
    final = correlations[-1][1]
    return RandomisationResult(
        correlations=correlations,
        final_correlation=final,
        threshold=threshold,
        passed=abs(final) < threshold,
    )
