"""Model-parameter randomisation check (Adebayo et al., 2018, cascading from the output layer).

What is compared to what: the method's map for the trained model against its map for the same
image and target class after the model's top layers are re-initialised, by Spearman rank
correlation. Layers are re-initialised one after another, from the output layer towards the
input, on a deep copy, as Quantus's model-parameter randomisation test does: each module's own
`reset_parameters()` (BatchNorm and subclasses such as timm's `BatchNormAct2d` reset their
running statistics too). A map that barely changes when the weights it should explain are
destroyed fails the check; so does one that degenerates (becomes constant or non-finite): it no
longer ranks anything, which is not evidence that the method depends on the weights.
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

from xai_exp.evaluate.agreement import rank_correlation
from xai_exp.evaluate.masks import DegenerateMapError, check_map
from xai_exp.models.classifier import Classifier, resolve_layer


@dataclass
class RandomisationResult:
    """Spearman correlation with the original map after each cascading randomisation step."""

    correlations: list[tuple[str, float]]  # (module name randomised at this step, rho)
    final_correlation: float  # NaN when the randomised map degenerated
    threshold: float
    passed: bool  # |final_correlation| < threshold, and no step degenerated

    @property
    def problem(self) -> str:
        """Why the check cannot pass beyond its rho: the step whose map degenerated ("" if none)."""
        for name, rho in self.correlations:
            if not math.isfinite(rho):
                return f"map degenerates after randomising {name} (constant or non-finite)"
        return ""

    @classmethod
    def from_correlations(
        cls, correlations: list[tuple[str, float]], threshold: float
    ) -> RandomisationResult:
        """The verdict of a list of (layer, rho) steps: passed when the last |rho| is below
        `threshold` and no step's map degenerated (NaN rho)."""
        final = correlations[-1][1]
        degenerate = any(not math.isfinite(rho) for _, rho in correlations)
        return cls(correlations, final, threshold, not degenerate and abs(final) < threshold)


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
    """Re-initialise a module's own parameters, as Quantus does: its `reset_parameters()`.

    That holds for modules with children too (timm's `BatchNormAct2d` is a BatchNorm2d with an
    activation child: its weights and running statistics are reset). A module with parameters
    but no `reset_parameters` has each own parameter redrawn from N(0, its current std), 0.02
    if that is zero, and its running statistics reset when it has them.
    """
    with torch.no_grad():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
            return
        for parameter in module.parameters(recurse=False):
            std = float(parameter.float().std()) if parameter.numel() > 1 else 0.0
            parameter.normal_(0.0, std if math.isfinite(std) and std > 0 else 0.02)
        reset_stats = getattr(module, "reset_running_stats", None)
        if callable(reset_stats):
            reset_stats()


def _correlation(original: np.ndarray, randomised: np.ndarray) -> float:
    """Spearman rho; NaN when the randomised map degenerated (constant or non-finite)."""
    try:
        return rank_correlation(original, randomised)
    except DegenerateMapError:
        return math.nan


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
    A constant original map raises DegenerateMapError; a randomised map that degenerates gives
    rho NaN at that step and fails the check (`RandomisationResult.problem` says where).
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
    return RandomisationResult.from_correlations(correlations, threshold)
