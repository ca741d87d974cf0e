"""LIME for images: lime's superpixels, perturbations and surrogate fit, with a batched fast path.

The fast path draws the same perturbation matrix from the same `random_state`, builds the
perturbed images on the model's device in large batches, and fits the surrogate with lime's own
`LimeBase`, so a seed gives the explanation `lime_image` gives.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from xai_exp.models import inference
from xai_exp.models.classifier import Classifier

KERNEL_WIDTH = 0.25  # lime_image's default


@dataclass
class LimeExplanation:
    """Superpixel weights of LIME's local surrogate for one target class."""

    segments: np.ndarray  # HxW int, superpixel id per pixel, ids 0..n-1
    weights: np.ndarray  # n float, surrogate weight per superpixel id
    intercept: float
    score: float


def fudged_image(image: np.ndarray, segments: np.ndarray, hide_color: int | None) -> np.ndarray:
    """What a hidden superpixel shows: its mean colour (lime's default) or `hide_color`."""
    if hide_color is not None:
        return np.full_like(image, hide_color)
    counts = np.bincount(segments.ravel())
    fudged = np.empty_like(image)
    for channel in range(3):
        sums = np.bincount(segments.ravel(), weights=image[..., channel].ravel().astype(np.float64))
        fudged[..., channel] = (sums / counts)[segments]  # truncated to uint8 as lime does
    return fudged


@contextlib.contextmanager
def _quiet_lime() -> Iterator[None]:
    from lime import lime_image

    original = lime_image.tqdm
    lime_image.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        lime_image.tqdm = original


def reference_lime(
    classifier: Classifier,
    image: np.ndarray,
    segments: np.ndarray,
    target_class: int,
    *,
    num_samples: int,
    hide_color: int | None,
    seed: int,
    batch_size: int = 10,
    precision: str = "fp32",
) -> LimeExplanation:
    """lime_image.LimeImageExplainer, exactly as the package runs it, on given superpixels."""
    from lime import lime_image

    explainer = lime_image.LimeImageExplainer(random_state=seed)
    with _quiet_lime():
        explanation = explainer.explain_instance(
            image,
            functools.partial(classifier.predict, precision=precision),
            labels=(target_class,),
            top_labels=None,
            hide_color=hide_color,
            num_samples=num_samples,
            batch_size=batch_size,
            segmentation_fn=lambda _: segments,
        )
    weights = np.zeros(int(segments.max()) + 1)
    for feature, weight in explanation.local_exp[target_class]:
        weights[feature] = weight
    return LimeExplanation(
        segments=segments,
        weights=weights,
        intercept=float(explanation.intercept[target_class]),
        score=float(explanation.score),
    )


def perturbation_matrix(random_state: np.random.RandomState, num_samples: int, n_features: int):
    """lime's on/off matrix: first row all on; same draws from the same random state."""
    random_state.randint(0, high=1000)  # explain_instance draws a segmentation seed first
    data = random_state.randint(0, 2, num_samples * n_features).reshape((num_samples, n_features))
    data[0, :] = 1
    return data


def perturbed_probabilities(
    classifier: Classifier,
    image: np.ndarray,
    fudged: np.ndarray,
    segments: np.ndarray,
    data: np.ndarray,
    target_class: int,
    batch_size: int,
    precision: str = "fp32",
) -> np.ndarray:
    """Target-class probability of every perturbed image, built and classified on the device.

    Each batch is built in NHWC (so its NCHW view is channels_last, the layout the inference
    copy of the network runs fastest in) and classified by
    `xai_exp.models.inference.forward_logits`.
    """
    device = classifier.device
    original = classifier.normalised_pixels(image)  # 1xHxWx3
    hidden = classifier.normalised_pixels(fudged)
    segment_ids = torch.from_numpy(segments.astype(np.int64)).to(device)
    switches = torch.from_numpy(np.asarray(data, dtype=bool)).to(device)
    chunk = inference.max_batch(device)
    if chunk is not None and batch_size > chunk:
        batch_size -= batch_size % chunk  # whole forward chunks: one short chunk at the end
    probabilities = []
    with torch.inference_mode():
        for start in range(0, len(data), max(1, batch_size)):
            keep = switches[start : start + batch_size][:, segment_ids, None]  # BxHxWx1
            batch = torch.where(keep, original, hidden).permute(0, 3, 1, 2)  # channels_last
            logits = inference.forward_logits(classifier, batch, precision)
            probabilities.append(logits.softmax(dim=-1)[:, target_class].cpu())
    return torch.cat(probabilities).double().numpy()


def fast_lime(
    classifier: Classifier,
    image: np.ndarray,
    segments: np.ndarray,
    target_class: int,
    *,
    num_samples: int,
    hide_color: int | None,
    seed: int,
    batch_size: int = 100,
    precision: str = "fp32",
) -> LimeExplanation:
    """Same explanation as `reference_lime`, with batched on-device perturbations."""
    # lime and scikit-learn load when LIME runs, not when a fully cached run starts
    import sklearn.metrics
    from lime import lime_base
    from sklearn.utils import check_random_state

    random_state = check_random_state(seed)
    n_features = int(segments.max()) + 1
    data = perturbation_matrix(random_state, num_samples, n_features)
    fudged = fudged_image(image, segments, hide_color)
    labels = perturbed_probabilities(
        classifier, image, fudged, segments, data, target_class, batch_size, precision
    )
    distances = sklearn.metrics.pairwise_distances(data, data[0:1], metric="cosine").ravel()

    def kernel(d: np.ndarray) -> np.ndarray:
        return np.sqrt(np.exp(-(d**2) / KERNEL_WIDTH**2))

    base = lime_base.LimeBase(kernel, verbose=False, random_state=random_state)
    intercept, local_exp, score, _ = base.explain_instance_with_data(
        data, labels[:, None], distances, 0, 100000, feature_selection="auto"
    )
    weights = np.zeros(n_features)
    for feature, weight in local_exp:
        weights[feature] = weight
    return LimeExplanation(
        segments=segments, weights=weights, intercept=float(intercept), score=float(score)
    )
