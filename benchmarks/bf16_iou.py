"""How much bf16 autocast moves the masks: IoU of bf16 vs fp32 masks, bundled model and images.

    python benchmarks/bf16_iou.py --methods ablationcam lime --images 6 --lime-samples 200

Runs xai-exp's fast paths with `precision="bf16"` and `"fp32"` on the same inputs: the CAMs'
top-10% masks and LIME's top-5 positive superpixels (same superpixels, same seed) are compared by
IoU. grad-cam's own gradient CAMs cannot run under bf16 autocast (grad-cam calls `.numpy()` on
bf16 activations: "Got unsupported ScalarType BFloat16"), so they are not offered.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xai_exp.app.hydra_app import compose_config
from xai_exp.config import ModelConfig
from xai_exp.data.images import bundled_images
from xai_exp.evaluate.masks import cam_top_fraction_mask, lime_top_k_mask
from xai_exp.evaluate.overlap import iou
from xai_exp.explain import fast_cam
from xai_exp.explain.lime import fast_lime, segment
from xai_exp.models.classifier import fit_to_input, load_classifier


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["ablationcam", "lime"],
        choices=["scorecam", "ablationcam", "lime"],
    )
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--fraction", type=float, default=0.10)
    parser.add_argument("--lime-samples", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/bf16_iou.json")
    args = parser.parse_args()
    classifier = load_classifier(ModelConfig(), args.device)
    lime = compose_config().lime  # the default run's LIME settings
    results = []
    for item in bundled_images(args.images):
        view = fit_to_input(item.image, classifier.input_size)
        x = classifier.input_tensor(view)
        with torch.inference_mode():
            target = int(classifier.model(x).argmax())
        segments = segment(view, lime.segmentation.algorithm, dict(lime.segmentation.params))
        for method in args.methods:
            start = time.perf_counter()
            masks = {}
            for precision in ("fp32", "bf16"):
                if method == "lime":
                    weights = fast_lime(
                        classifier,
                        view,
                        segments,
                        target,
                        num_samples=args.lime_samples,
                        hide_color=None,
                        seed=0,
                        precision=precision,
                    ).weights
                    masks[precision] = lime_top_k_mask(segments, weights, lime.num_features)
                else:
                    cam = fast_cam.FAST_METHODS[method](
                        classifier, x, target, 64, precision=precision
                    )
                    masks[precision] = cam_top_fraction_mask(cam, args.fraction)
            value = iou(masks["fp32"], masks["bf16"])
            seconds = time.perf_counter() - start
            results.append({"image": item.name, "method": method, "iou": value, "s": seconds})
            print(f"{item.name:<16} {method:<12} IoU(bf16, fp32) = {value:.4f} ({seconds:.1f} s)")
    for method in args.methods:
        values = [r["iou"] for r in results if r["method"] == method]
        print(f"{method}: mean IoU {np.mean(values):.4f}, min {np.min(values):.4f}")
    Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
