"""What the pixel-exact view changes (issue #23.1): the old rounded view against the model's own.

    python benchmarks/view_effect.py                   # bundled model and photos, offline
    python benchmarks/view_effect.py --dir PHOTOS --arch resnet18 --weights IMAGENET1K_V1
    python benchmarks/view_effect.py --source timm --arch vit_tiny_patch16_224 --views-only

Per image: the top-1 probability of the model on the view before issue #23 (resize
`round(size / crop_fraction)`, long side rounded, crop offset floored; kept here only) and on
the view now (the model's eval transform, pixel for pixel), whether the two views' pixels are
identical, and the IoU of their Grad-CAM top-10% masks for the same class (the new view's
top-1), compared in view coordinates (the two crops differ by at most a pixel or so).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xai_exp.config import ModelConfig
from xai_exp.data.images import bundled_images, folder_images
from xai_exp.evaluate.masks import cam_top_fraction_mask
from xai_exp.evaluate.overlap import iou
from xai_exp.explain.cam import compute_cam
from xai_exp.models.classifier import load_classifier
from xai_exp.models.views import RESAMPLING


def old_view(image: np.ndarray, size: int, crop_fraction: float, interpolation: str) -> np.ndarray:
    """xai_exp/views.py before issue #23: its own rounding, not the libraries'."""
    pil = Image.fromarray(image)
    width, height = pil.size
    shorter = max(size, round(size / crop_fraction))
    scale = shorter / min(width, height)
    new_w, new_h = max(shorter, round(width * scale)), max(shorter, round(height * scale))
    pil = pil.resize((new_w, new_h), RESAMPLING[interpolation])
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(pil.crop((left, top, left + size, top + size)), dtype=np.uint8).copy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="a folder of photos (default: bundled)")
    parser.add_argument("--arch", default="efficientnet_lite0")
    parser.add_argument("--weights", default="bundled", help="'none': random init")
    parser.add_argument("--source", default="auto", choices=["auto", "torchvision", "timm"])
    parser.add_argument("--views-only", action="store_true", help="only compare the pixels")
    parser.add_argument("--fraction", type=float, default=0.10)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    weights = None if args.weights == "none" else args.weights
    model = ModelConfig(source=args.source, arch=args.arch, weights=weights, input_size=None)
    if weights != "bundled":
        model.target_layer = None  # the family's default
    classifier = load_classifier(model, "cpu")
    view = classifier.view
    items = folder_images(args.dir, args.limit)[0] if args.dir else bundled_images(args.limit)
    print(
        f"{args.arch} ({args.weights}): view {view}; old: resize "
        f"{max(view.size, round(view.size / classifier.crop_fraction))}, rounded"
    )
    print(f"{'image':<22} {'size':>9} {'same px':>7} {'old p1':>7} {'new p1':>7} {'class':>6} IoU")
    rows = []
    for item in items:
        image = np.asarray(item.image)
        old = old_view(image, view.size, classifier.crop_fraction, view.interpolation)
        new = view.image(image)
        if args.views_only:
            same = np.array_equal(old, new)
            print(f"{item.name[:22]:<22} {image.shape[1]:>4}x{image.shape[0]:<4} {same}")
            rows.append({"image": item.name, "identical": bool(same)})
            continue
        old_p, new_p = classifier.predict(old)[0], classifier.predict(new)[0]
        target = int(new_p.argmax())
        masks = [
            cam_top_fraction_mask(
                compute_cam(classifier, classifier.input_tensor(v), "gradcam", target),
                args.fraction,
            )
            for v in (old, new)
        ]
        row = {
            "image": item.name,
            "size": f"{image.shape[1]}x{image.shape[0]}",
            "identical": bool(np.array_equal(old, new)),
            "old_top1": float(old_p.max()),
            "new_top1": float(new_p.max()),
            "same_class": int(old_p.argmax()) == target,
            "mask_iou": float(iou(*masks)),
        }
        rows.append(row)
        print(
            f"{row['image'][:22]:<22} {row['size']:>9} {'yes' if row['identical'] else 'no':>7} "
            f"{row['old_top1']:7.3f} {row['new_top1']:7.3f} "
            f"{'same' if row['same_class'] else 'other':>6} {row['mask_iou']:.3f}"
        )
    same = sum(row["identical"] for row in rows)
    print(f"identical views: {same}/{len(rows)}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
