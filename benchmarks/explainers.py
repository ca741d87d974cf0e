"""Reference explainers (issue #20): ours against the library's own call, per image.

    python benchmarks/explainers.py --images 2 --out benchmarks/results_explainers.json

On the bundled EfficientNet-Lite0 and the bundled photos (offline), in one process, for each
image and the model's top-1 class:

* KernelSHAP (`--shap-samples`, LIME's quickshift superpixels, segment-mean baseline) and
  Occlusion (`--window`/`--stride`, baseline 0): ours (`xai_exp.explain.captum_methods`,
  forward passes through `inference.forward_logits`, the `--engine`) against Captum's class
  called directly on the plain torch model (softmax of `classifier.model`), same batch size;
* Integrated Gradients (`--ig-steps`): ours against Captum's class on the plain model (the same
  computation: ours runs the torch model too, since it needs gradients);
* RISE (`--rise-masks`): `rise.rise` (batched, engine) against `rise.rise_reference` (one mask
  at a time through the plain model).

The two calls of a pair alternate which runs first from image to image. Prints seconds per
image (medians), library/ours ratios and the largest difference between the two maps relative
to the library's largest magnitude, and writes the rows as JSON (`--out`). Both sides get the
same NCHW-contiguous input tensor (Captum builds perturbed inputs ~3x faster from it than from
the channels_last `input_tensor`), so the ratios measure the forward passes and batching.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xai_exp.config import ModelConfig
from xai_exp.data.images import bundled_images
from xai_exp.explain import captum_methods, lime, rise, superpixels
from xai_exp.models import inference
from xai_exp.models.classifier import load_classifier

QUICKSHIFT = ("quickshift", {"kernel_size": 4, "max_dist": 200, "ratio": 0.2})  # LIME's default


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2, help="bundled images (1-6)")
    parser.add_argument("--engine", default="auto", choices=("auto", "torch", "onnxruntime"))
    parser.add_argument("--batch", type=int, default=32, help="inputs per forward call, both")
    parser.add_argument("--shap-samples", type=int, default=200)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--ig-steps", type=int, default=32)
    parser.add_argument("--rise-masks", type=int, default=500)
    parser.add_argument("--rise-grid", type=int, default=7)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    return parser.parse_args(argv)


def timed(fn, *args, **kwargs) -> tuple[np.ndarray, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def relative_difference(ours: np.ndarray, library: np.ndarray) -> float:
    return float(np.abs(ours - library).max() / max(np.abs(library).max(), 1e-30))


def library_calls(classifier, args):
    """The library's own call per method (Captum's class on the plain model; RISE's loop)."""
    from captum.attr import IntegratedGradients, KernelShap, Occlusion

    def probabilities(batch: torch.Tensor) -> torch.Tensor:
        return classifier.model(batch).softmax(dim=-1)

    def kernel_shap(view, segments, target):
        baselines = classifier.input_tensor(lime.fudged_image(view, segments, None)).contiguous()
        mask = torch.from_numpy(segments.astype(np.int64))[None, None]
        with torch.random.fork_rng():
            torch.manual_seed(0)
            weights = KernelShap(probabilities).attribute(
                classifier.input_tensor(view).contiguous(),
                baselines=baselines,
                target=target,
                feature_mask=mask,
                n_samples=args.shap_samples,
                perturbations_per_eval=args.batch,
                return_input_shape=False,
            )
        return weights.detach().reshape(-1).numpy().astype(np.float64)

    def occlusion(view, _segments, target):
        result = Occlusion(probabilities).attribute(
            classifier.input_tensor(view).contiguous(),
            sliding_window_shapes=(3, args.window, args.window),
            strides=(3, args.stride, args.stride),
            baselines=0.0,
            target=target,
            perturbations_per_eval=args.batch,
        )
        return result.detach()[0].sum(dim=0).numpy()

    def integrated_gradients(view, _segments, target):
        result = IntegratedGradients(probabilities).attribute(
            classifier.input_tensor(view).contiguous(),
            baselines=0.0,
            target=target,
            n_steps=args.ig_steps,
            method="gausslegendre",
            internal_batch_size=args.batch,
        )
        return result.detach()[0].sum(dim=0).numpy()

    def rise_loop(view, _segments, target):
        return rise.rise_reference(
            classifier,
            view,
            target,
            num_masks=args.rise_masks,
            grid_size=args.rise_grid,
            keep_probability=0.5,
            seed=0,
        )

    return {
        "kernel_shap": kernel_shap,
        "occlusion": occlusion,
        "integrated_gradients": integrated_gradients,
        "rise": rise_loop,
    }


def our_calls(classifier, args):
    batch = args.batch
    return {
        "kernel_shap": lambda view, segments, target: captum_methods.kernel_shap(
            classifier,
            view,
            segments,
            target,
            num_samples=args.shap_samples,
            hide_color=None,
            seed=0,
            batch_size=batch,
        ),
        "occlusion": lambda view, _segments, target: captum_methods.occlusion(
            classifier,
            view,
            target,
            window=args.window,
            stride=args.stride,
            baseline=0.0,
            batch_size=batch,
        ),
        "integrated_gradients": lambda view, _segments, target: captum_methods.integrated_gradients(
            classifier, view, target, steps=args.ig_steps, baseline=0.0, batch_size=batch
        ),
        "rise": lambda view, _segments, target: rise.rise(
            classifier,
            view,
            target,
            num_masks=args.rise_masks,
            grid_size=args.rise_grid,
            keep_probability=0.5,
            seed=0,
            batch_size=batch,
        ),
    }


def cpu_name() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor()
    names = [line.split(":", 1)[1].strip() for line in lines.splitlines() if "Model name" in line]
    return names[0] if names else platform.processor()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    classifier = load_classifier(ModelConfig(), "cpu")
    engine = inference.prepare_for_inference(classifier, args.engine)
    items = bundled_images(args.images)
    views = [classifier.view.image(item.image) for item in items]
    library, ours = library_calls(classifier, args), our_calls(classifier, args)
    # warm-up: every batch shape both paths run, so kernel selection stays out of the timings
    x = classifier.input_tensor(views[0])
    for size in sorted({1, args.batch, inference.ONNX_BATCH}):
        batch = x.expand(size, -1, -1, -1).contiguous()
        with torch.no_grad():
            classifier.model(batch)
        inference.forward_logits(classifier, batch, "fp32")
    # ... one backward pass, and the imports a first KernelSHAP fit would otherwise time
    import sklearn.linear_model  # noqa: F401

    with torch.enable_grad():
        classifier.model(x.requires_grad_())[0, 0].backward()
    classifier.model.zero_grad()
    rows = []
    for index, (item, view) in enumerate(zip(items, views, strict=True)):
        target = int(classifier.predict(view)[0].argmax())
        segments = superpixels.segment(view, *QUICKSHIFT)
        for method in ours:
            order = [("ours", ours), ("library", library)]
            if index % 2:
                order.reverse()
            results = {}
            row = {"image": item.name, "method": method, "target": target}
            for name, calls in order:
                results[name], row[f"{name}_s"], row[f"{name}_cpu_s"] = timed(
                    calls[method], view, segments, target
                )
            row["ratio"] = row["library_s"] / row["ours_s"]
            row["relative_difference"] = relative_difference(results["ours"], results["library"])
            rows.append(row)
            print(
                f"{item.name:16s} {method:21s} ours {row['ours_s']:6.2f} s  library "
                f"{row['library_s']:6.2f} s  x{row['ratio']:.2f}  "
                f"diff {row['relative_difference']:.1e}",
                flush=True,
            )
    summary = {}
    print(
        f"\nmedian seconds per image ({len(items)} images, engine {engine}, {cpu_name()}, "
        f"{torch.get_num_threads()} threads)"
    )
    print(
        f"{'method':21s} {'ours':>8s} {'library':>8s} {'ratio':>6s} "
        f"{'ours cpu':>8s} {'lib cpu':>8s} {'ratio':>6s} {'max diff':>9s}"
    )
    for method in ours:
        mine = [r for r in rows if r["method"] == method]
        ours_s = statistics.median(r["ours_s"] for r in mine)
        library_s = statistics.median(r["library_s"] for r in mine)
        ours_cpu = statistics.median(r["ours_cpu_s"] for r in mine)
        library_cpu = statistics.median(r["library_cpu_s"] for r in mine)
        diff = max(r["relative_difference"] for r in mine)
        summary[method] = {
            "ours_s": ours_s,
            "library_s": library_s,
            "ours_cpu_s": ours_cpu,
            "library_cpu_s": library_cpu,
            "max_difference": diff,
        }
        print(
            f"{method:21s} {ours_s:8.2f} {library_s:8.2f} {library_s / ours_s:6.2f} "
            f"{ours_cpu:8.2f} {library_cpu:8.2f} {library_cpu / ours_cpu:6.2f} {diff:9.1e}"
        )
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        payload = {
            "settings": settings,
            "engine": engine,
            "cpu": cpu_name(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "captum": importlib.metadata.version("captum"),
            "load_average": os.getloadavg(),
            "rows": rows,
            "summary": summary,
        }
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
