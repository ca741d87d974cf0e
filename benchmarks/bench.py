"""Seed-study benchmark: grad-cam / lime as the seed project ran them vs xai-exp's fast paths.

Per image it runs, in one process on the same model, device and images:

* baseline: grad-cam's GradCAM, ScoreCAM (batch 16, grad-cam's default), AblationCAM (batch 32,
  grad-cam's default) and lime_image (defaults, `--lime-samples`, batch_size=10);
* ours: `compute_cam(..., implementation="fast")` for the same three methods and `fast_lime`
  (the project's default batch sizes: CAM 64, LIME 100), forward-only passes through the
  `--engine` (auto: ONNX Runtime on a CPU);

and prints median seconds per image, baseline/ours ratios, the forward-pass floor and the peak
RSS, then writes everything as JSON (`--out`). The own floor is the forward passes our paths
run times the per-image cost of the engine: with ONNX Runtime, a standalone session of the
same exported graph (numpy in, numpy out, batch `inference.ONNX_BATCH`), not our wrapper.

    python benchmarks/bench.py --arch resnet18 --weights null --images 2 --lime-samples 1000
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xai_exp.config import LimeConfig, MethodConfig, ModelConfig
from xai_exp.data.images import bundled_images
from xai_exp.explain import cam, fast_cam, lime, superpixels
from xai_exp.models import inference, onnx_engine
from xai_exp.models.classifier import fit_to_input, load_classifier

CAMS = ("gradcam", "scorecam", "ablationcam")
BASELINE_BATCH = {"gradcam": 1, "scorecam": 16, "ablationcam": 32}  # grad-cam's defaults
LIME_BASELINE_BATCH = 10  # lime_image's default
TARGETS = {"study_speedup": 2.5, "study_vs_floor": 1.2, "ablation_speedup": 50.0, "rss_gb": 3.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--weights", default="null", help="torchvision weights name or null")
    parser.add_argument("--target-layer", default="layer4.-1")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=2, help="bundled images to explain (1-6)")
    parser.add_argument("--lime-samples", type=int, default=1000)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--engine", default="auto", choices=("auto", "torch", "onnxruntime"))
    parser.add_argument("--cam-batch", type=int, default=MethodConfig().batch_size)
    parser.add_argument("--lime-batch", type=int, default=LimeConfig().batch_size)
    parser.add_argument("--skip-baseline", action="store_true", help="time only xai-exp's paths")
    parser.add_argument("--out", default="benchmarks/results.json")
    return parser.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device: torch.device, fn, *args, **kwargs):
    """(result, wall seconds, process CPU seconds). CPU time is robust to other processes
    competing for the cores; wall time is what a user waits."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    sync(device)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def per_image_cost(network, classifier, batch_size: int, channels_last: bool, seconds=4.0):
    """(wall, CPU) seconds per image of logits-only forward passes at `batch_size`, medians."""
    size = classifier.input_size
    batch = torch.randn(batch_size, 3, size, size, device=classifier.device)
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    walls, cpus = [], []
    with torch.inference_mode():
        network(batch)  # warm-up: oneDNN / cuDNN pick their kernels
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(walls) < 3:
            _, wall, cpu = timed(classifier.device, network, batch)
            walls.append(wall)
            cpus.append(cpu)
    return statistics.median(walls) / batch_size, statistics.median(cpus) / batch_size


def standalone_onnx_cost(classifier, batch_size: int, seconds=4.0) -> tuple[float, float]:
    """(wall, CPU) seconds per image of a bare ONNX Runtime session of the exported graph."""
    import onnxruntime

    graph = onnx_engine.export_graph(classifier.model, classifier.input_size)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_free_dimension_override_by_name(onnx_engine.BATCH_AXIS, batch_size)
    session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    size = classifier.input_size
    pixels = np.random.default_rng(0).standard_normal((batch_size, 3, size, size), np.float32)
    session.run(None, {name: pixels})
    walls, cpus = [], []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(walls) < 3:
        _, wall, cpu = timed(classifier.device, session.run, None, {name: pixels})
        walls.append(wall)
        cpus.append(cpu)
    return statistics.median(walls) / batch_size, statistics.median(cpus) / batch_size


def engine_cost(classifier, engine: str, network, chunk: int, channels_last: bool, seconds):
    """Per-image cost of the engine that runs our forward-only passes."""
    if engine == "onnxruntime":
        return standalone_onnx_cost(classifier, inference.ONNX_BATCH, seconds)
    return per_image_cost(network, classifier, chunk, channels_last, seconds)


def forward_backward_cost(classifier, repeats: int = 5) -> tuple[float, float]:
    """(wall, CPU) seconds of one forward + backward pass at batch 1 (Grad-CAM's cost)."""
    size = classifier.input_size
    x = torch.randn(1, 3, size, size, device=classifier.device)

    def step() -> None:
        with torch.enable_grad():
            classifier.model.zero_grad()
            classifier.model(x)[0, 0].backward()

    timings = [timed(classifier.device, step) for _ in range(repeats + 1)][1:]
    classifier.model.zero_grad()
    return statistics.median(t[1] for t in timings), statistics.median(t[2] for t in timings)


def warm_up(classifier, batch_sizes: list[int], precision: str) -> None:
    """First passes at each batch shape build oneDNN primitives; keep that out of the timings."""
    size = classifier.input_size
    for batch_size in batch_sizes:
        x = torch.randn(batch_size, 3, size, size, device=classifier.device)
        with torch.inference_mode():
            classifier.model(x)
        with torch.no_grad():  # grad-cam's gradient-free passes run under no_grad
            classifier.model(x)
        inference.forward_logits(classifier, x, precision)
    forward_backward_cost(classifier, repeats=1)


def run_image(classifier, image, target, args, results, index: int) -> dict:
    """Baseline and ours per method, interleaved (order alternating per image), so that load
    from other processes hits both alike."""
    device = classifier.device
    x = classifier.input_tensor(image)
    quickshift = ("quickshift", {"kernel_size": 4, "max_dist": 200, "ratio": 0.2})  # lime's
    row: dict = {"target": target}
    lime_args = {"num_samples": args.lime_samples, "hide_color": None, "seed": 0}

    def record(name: str, timing: tuple) -> object:
        row[name], row[f"{name}_cpu"] = timing[1], timing[2]
        return timing[0]

    def baseline(method: str):
        if method == "lime":  # lime_image segments inside explain_instance: time it too
            segments, seg_wall, seg_cpu = timed(device, superpixels.segment, image, *quickshift)
            result = timed(
                device,
                lime.reference_lime,
                classifier,
                image,
                segments,
                target,
                batch_size=LIME_BASELINE_BATCH,
                **lime_args,
            )
            return record("baseline_lime", (result[0], result[1] + seg_wall, result[2] + seg_cpu))
        timing = timed(
            device, cam.reference_cam, classifier, x, method, target, BASELINE_BATCH[method]
        )
        return record(f"baseline_{method}", timing)

    def ours(method: str):
        if method == "lime":
            segments, seg_wall, seg_cpu = timed(device, superpixels.segment, image, *quickshift)
            row["lime_features"] = int(segments.max()) + 1
            result = timed(
                device,
                lime.fast_lime,
                classifier,
                image,
                segments,
                target,
                batch_size=args.lime_batch,
                precision=args.precision,
                **lime_args,
            )
            return record("ours_lime", (result[0], result[1] + seg_wall, result[2] + seg_cpu))
        batch = BASELINE_BATCH["ablationcam"] if method == "ablationcam" else args.cam_batch
        timing = timed(
            device,
            cam.compute_cam,
            classifier,
            x,
            method,
            target,
            batch,
            "fast",
            precision=args.precision,
        )
        return record(f"ours_{method}", timing)

    for method in [*CAMS, "lime"]:
        if args.skip_baseline:
            ours(method)
            continue
        if index % 2 == 0:
            reference, fast = baseline(method), ours(method)
        else:
            fast, reference = ours(method), baseline(method)
        if method == "lime":
            scale = np.abs(reference.weights).max()
            row["maxrel_lime"] = float(np.abs(fast.weights - reference.weights).max() / scale)
        else:
            row[f"maxdiff_{method}"] = float(np.abs(fast - reference).max())
    # forward passes xai-exp's Score-CAM actually ran (unique masks)
    activations, _ = fast_cam._activations_and_logits(classifier, x, args.precision)
    size = (x.size(-2), x.size(-1))
    row["scorecam_unique_masks"] = len(set(fast_cam.unique_masks(activations[0], size)))
    row["channels"] = int(activations.shape[1])
    row["loadavg_1min"] = os.getloadavg()[0]
    # the forward-pass cost right now (the load from other processes varies during a run)
    entry = inference._prepared(classifier)
    network = inference.inference_network(classifier)
    chunk = inference.max_batch(device) or max(args.cam_batch, args.lime_batch)
    large = 64 if device.type == "cuda" else 32
    row["raw_cost"] = per_image_cost(classifier.model, classifier, large, False, seconds=2.0)
    row["copy_cost"] = engine_cost(
        classifier, args.engine_used, network, chunk, entry.channels_last, 2.0
    )
    results["images"].append(row)
    return row


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor()
    for line in out.splitlines():
        if line.startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def median(rows: list[dict], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    weights = None if args.weights in ("null", "none", "None") else args.weights
    cfg = ModelConfig(
        arch=args.arch, weights=weights, target_layer=args.target_layer, input_size=args.input_size
    )
    classifier = load_classifier(cfg, args.device)
    args.engine_used = inference.prepare_for_inference(classifier, args.engine, args.precision)
    entry = inference._prepared(classifier)
    items = bundled_images(args.images)
    images = [fit_to_input(item.image, args.input_size) for item in items]
    with torch.inference_mode():
        logits = classifier.model(classifier.input_tensor(np.stack(images)))
    targets = [int(t) for t in logits.argmax(dim=-1).tolist()]

    chunk = inference.max_batch(classifier.device) or max(args.cam_batch, args.lime_batch)
    warm_up(classifier, sorted({1, 10, 16, 32, chunk}), args.precision)
    print(
        f"device={args.device} precision={args.precision} threads={torch.get_num_threads()} "
        f"cpu={lscpu_model()!r} inference copy: bn_folded={entry.fused} "
        f"channels_last={entry.channels_last} engine={args.engine_used}",
        flush=True,
    )
    results: dict = {
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "args": vars(args),
        "machine": {
            "cpu": lscpu_model(),
            "cores": torch.get_num_threads(),
            "torch": torch.__version__,
            "onnxruntime": _version("onnxruntime"),
            "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        },
        "inference_copy": {"bn_folded": entry.fused, "channels_last": entry.channels_last},
        "engine": args.engine_used,
        "images": [],
    }
    for index, (item, image, target) in enumerate(zip(items, images, targets, strict=True)):
        row = run_image(classifier, image, target, args, results, index)
        print(
            f"[{index + 1}/{len(images)}] {item.name} target={target} "
            + " ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float))
            + f" fwd img/s raw={1 / row['raw_cost'][0]:.1f} "
            + f"{args.engine_used}={1 / row['copy_cost'][0]:.1f}",
            flush=True,
        )

    # forward-pass floor, in wall seconds and in CPU seconds
    large = 64 if args.device == "cuda" else 32
    network = inference.inference_network(classifier)
    raws = [per_image_cost(classifier.model, classifier, large, channels_last=False)]
    copies = [engine_cost(classifier, args.engine_used, network, chunk, entry.channels_last, 4.0)]
    raws += [row["raw_cost"] for row in results["images"]]
    copies += [row["copy_cost"] for row in results["images"]]
    # median over the measurements taken after each image and at the end
    raw = tuple(statistics.median(cost[k] for cost in raws) for k in (0, 1))
    copy = tuple(statistics.median(cost[k] for cost in copies) for k in (0, 1))
    fwd_bwd = forward_backward_cost(classifier)
    rows = results["images"]
    channels = rows[0]["channels"]
    unique = statistics.median(row["scorecam_unique_masks"] for row in rows)
    spec_passes = {"scorecam": channels + 1, "ablationcam": channels + 1, "lime": args.lime_samples}
    own_passes = {"scorecam": unique + 1, "ablationcam": 1, "lime": args.lime_samples}
    methods = [*CAMS, "lime"]
    results["floor"] = {
        "raw_model_images_per_s": 1 / raw[0],
        "inference_copy_images_per_s": 1 / copy[0],
        "raw_model_cpu_s_per_image": raw[1],
        "inference_copy_cpu_s_per_image": copy[1],
        "gradcam_fwd_bwd_s": fwd_bwd[0],
        "gradcam_fwd_bwd_cpu_s": fwd_bwd[1],
        "passes_spec": spec_passes,
        "passes_own": own_passes,
    }
    results["summary"] = {}
    for clock, k in (("wall", 0), ("cpu", 1)):
        suffix = "" if clock == "wall" else "_cpu"
        floor_spec = {"gradcam": fwd_bwd[k]} | {m: n * raw[k] for m, n in spec_passes.items()}
        floor_own = {"gradcam": fwd_bwd[k]} | {m: n * copy[k] for m, n in own_passes.items()}
        summary: dict = {}
        print(
            f"\n[{clock} seconds] per-image medians over {len(rows)} images ({args.arch}, "
            f"{args.input_size}px, LIME {args.lime_samples} samples, {args.precision})"
        )
        print(
            f"{'method':<12}{'baseline':>10}{'ours':>10}{'speedup':>9}"
            f"{'floor(spec)':>13}{'floor(own)':>12}{'ours/own':>10}"
        )
        for method in [*methods, "study"]:
            if method == "study":
                ours = sum(summary[m]["ours_s"] for m in methods)
                base = sum(summary[m]["baseline_s"] or 0 for m in methods) or None
                spec = sum(floor_spec.values())
                own = sum(floor_own.values())
            else:
                ours = median(rows, f"ours_{method}{suffix}")
                base = None if args.skip_baseline else median(rows, f"baseline_{method}{suffix}")
                spec, own = floor_spec[method], floor_own[method]
            summary[method] = {
                "baseline_s": base,
                "ours_s": ours,
                "speedup": base / ours if base else None,
                "floor_spec_s": spec,
                "floor_own_s": own,
                "ours_over_own_floor": ours / own,
            }
            row = summary[method]
            print(
                f"{method:<12}{(base or float('nan')):>10.3f}{ours:>10.3f}"
                f"{(row['speedup'] or float('nan')):>9.2f}{spec:>13.3f}{own:>12.3f}"
                f"{row['ours_over_own_floor']:>10.2f}"
            )
        results["summary"][clock] = summary
    print(
        f"\nthroughput: raw model {1 / raw[0]:.1f} img/s (batch {large}), "
        f"{'standalone ONNX Runtime' if args.engine_used == 'onnxruntime' else 'inference copy'} "
        f"{1 / copy[0]:.1f} img/s; Grad-CAM fwd+bwd {fwd_bwd[0]:.3f} s; "
        f"Score-CAM unique masks {unique:g}/{channels}; "
        f"load average during run {statistics.mean(r['loadavg_1min'] for r in rows):.1f}"
    )
    if not args.skip_baseline:
        for method in CAMS:
            worst = max(row[f"maxdiff_{method}"] for row in rows)
            print(f"parity {method}: max |ours - grad-cam| = {worst:.2e}")
        print(f"parity lime: max rel weight diff = {max(r['maxrel_lime'] for r in rows):.2e}")

    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB
    results["peak_rss_gb"] = rss_gb
    checks = {}
    for clock in ("wall", "cpu"):
        summary = results["summary"][clock]
        checks[f"study_speedup[{clock}]"] = (
            summary["study"]["speedup"],
            ">=",
            TARGETS["study_speedup"],
        )
        checks[f"study_vs_own_floor[{clock}]"] = (
            summary["study"]["ours_over_own_floor"],
            "<=",
            TARGETS["study_vs_floor"],
        )
        checks[f"ablation_speedup[{clock}]"] = (
            summary["ablationcam"]["speedup"],
            ">=",
            TARGETS["ablation_speedup"],
        )
    checks["peak_rss_gb"] = (rss_gb, "<=", TARGETS["rss_gb"])
    results["targets"] = {}
    print()
    for name, (value, op, goal) in checks.items():
        met = None if value is None else (value >= goal if op == ">=" else value <= goal)
        results["targets"][name] = {"value": value, "goal": f"{op} {goal}", "met": met}
        shown = "n/a" if value is None else f"{value:.3g}"
        verdict = "n/a" if met is None else ("met" if met else "NOT met")
        print(f"target {name}: {shown} (goal {op} {goal}) -> {verdict}")
    results["wall_s"] = time.perf_counter() - started
    print(f"peak RSS {rss_gb:.2f} GB, wall {results['wall_s']:.0f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
