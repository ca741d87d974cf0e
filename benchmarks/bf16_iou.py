"""How much bf16 autocast moves CAM masks: IoU of top-10% masks, bf16 vs fp32, bundled model.

    python benchmarks/bf16_iou.py --methods scorecam --images 6

Runs xai-exp's fast paths with `precision="bf16"` vs `"fp32"` (Score-CAM: the masked forward
passes in bf16). grad-cam's own gradient CAMs cannot run under bf16 autocast (grad-cam calls
`.numpy()` on bf16 activations: "Got unsupported ScalarType BFloat16"), so they are not offered.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xai_exp.config import ModelConfig
from xai_exp.data import bundled_images
from xai_exp.explainers import fast_cam
from xai_exp.models import fit_to_input, load_classifier


def top_mask(saliency: np.ndarray, fraction: float) -> np.ndarray:
    count = max(1, math.ceil(fraction * saliency.size))
    order = np.argsort(-saliency.ravel(), kind="stable")[:count]
    mask = np.zeros(saliency.size, dtype=bool)
    mask[order] = True
    return mask.reshape(saliency.shape)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def saliency(classifier, x, method: str, target: int, precision: str) -> np.ndarray:
    return fast_cam.FAST_METHODS[method](classifier, x, target, 32, precision=precision)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["scorecam"], choices=["scorecam"])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--fraction", type=float, default=0.10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/bf16_iou.json")
    args = parser.parse_args()
    classifier = load_classifier(ModelConfig(), args.device)
    results = []
    for item in bundled_images(args.images):
        image = fit_to_input(item.image, classifier.input_size)
        x = classifier.input_tensor(image)
        with torch.inference_mode():
            target = int(classifier.model(x).argmax())
        for method in args.methods:
            start = time.perf_counter()
            maps = {p: saliency(classifier, x, method, target, p) for p in ("fp32", "bf16")}
            value = iou(
                top_mask(maps["fp32"], args.fraction), top_mask(maps["bf16"], args.fraction)
            )
            diff = float(np.abs(maps["fp32"] - maps["bf16"]).max())
            results.append({"image": item.name, "method": method, "iou": value, "maxdiff": diff})
            print(
                f"{item.name:<16} {method:<10} IoU(top {args.fraction:.0%}) = {value:.4f} "
                f"max|diff| = {diff:.4f} ({time.perf_counter() - start:.1f} s)",
                flush=True,
            )
    for method in args.methods:
        values = [r["iou"] for r in results if r["method"] == method]
        print(f"{method}: mean IoU {np.mean(values):.4f}, min {np.min(values):.4f}")
    Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
