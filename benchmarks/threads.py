"""Threads against the CPU share: per-image Grad-CAM (torch) and one ONNX Runtime forward pass
of a LIME chunk, with 2 threads, 1 thread and `inference.threads=null` (auto), in one process.

Three scenarios, one after the other:

* idle: nothing of ours besides the benchmark (other users of the machine are not stopped);
* loaded: `--busy` busy-loop processes run beside it (not pinned), stopped afterwards;
* restricted: every thread of this process is pinned to one CPU (``os.sched_setaffinity``),
  no busy loop: torch and ONNX Runtime still start one thread per core of the machine.

The settings are interleaved round by round so that load from other processes hits each alike;
compare ratios within one run only.

    python benchmarks/threads.py --arch resnet18 --weights null --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
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
from xai_exp.explain import cam
from xai_exp.models import inference, onnx_engine, threads
from xai_exp.models.classifier import fit_to_input, load_classifier

BUSY_LOOP = "while True: pass"
SETTINGS: tuple[int | None, ...] = (2, 1, None)  # None: auto (the CPU share)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--weights", default="null", help="torchvision weights name or null")
    parser.add_argument("--target-layer", default="layer4.-1")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5, help="timings per setting and scenario")
    parser.add_argument("--busy", type=int, default=1, help="busy-loop processes when loaded")
    parser.add_argument("--onnx-batch", type=int, default=inference.ONNX_BATCH)
    parser.add_argument("--out", default="benchmarks/results_threads.json")
    return parser.parse_args(argv)


def pin_process(cpus: set[int]) -> None:
    """Pin every thread of this process (sched_setaffinity(0) pins only the caller's)."""
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(task), cpus)


def start_busy(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(count)]


def stop_busy(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.kill()
        process.wait()


def measure(args, classifier, image_tensor, target: int, batch, sessions: dict) -> dict:
    """Median seconds per setting: Grad-CAM of one image and an ONNX pass of one batch."""
    timings: dict[str, dict[str, list[float]]] = {}
    resolved = {}
    for _ in range(args.rounds):
        for setting in SETTINGS:
            count = threads.inference_threads(setting)
            name = "auto" if setting is None else str(setting)
            resolved[name] = count.describe()
            torch.set_num_threads(count.threads)
            started = time.perf_counter()
            cam.compute_cam(classifier, image_tensor, "gradcam", target)
            middle = time.perf_counter()
            sessions[count.threads](batch)
            done = time.perf_counter()
            row = timings.setdefault(name, {"gradcam": [], "onnx": []})
            row["gradcam"].append(middle - started)
            row["onnx"].append(done - middle)
    return {
        name: {
            "threads": resolved[name],
            **{part: statistics.median(values) for part, values in row.items()},
        }
        for name, row in timings.items()
    }


def report(scenario: str, found: dict) -> None:
    print(f"\n{scenario}:")
    for name, row in found.items():
        print(
            f"  threads={name:<5} ({row['threads']}): gradcam {row['gradcam']:.3f} s/image, "
            f"onnx batch {row['onnx']:.3f} s"
        )
    for part in ("gradcam", "onnx"):
        two, one, auto = (found[name][part] for name in ("2", "1", "auto"))
        print(f"  {part}: 2 threads / 1 thread = {two / one:.2f}x, 2 / auto = {two / auto:.2f}x")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    weights = None if args.weights in ("null", "none", "None") else args.weights
    cfg = ModelConfig(
        arch=args.arch, weights=weights, target_layer=args.target_layer, input_size=args.input_size
    )
    classifier = load_classifier(cfg, "cpu")
    image = fit_to_input(bundled_images(1)[0].image, args.input_size)
    image_tensor = classifier.input_tensor(image)
    with torch.inference_mode():
        target = int(classifier.model(image_tensor).argmax())
    rng = np.random.default_rng(0)
    batch = torch.from_numpy(
        rng.standard_normal((args.onnx_batch, 3, args.input_size, args.input_size), np.float32)
    )
    sessions = {
        n: onnx_engine.onnx_network(
            classifier.model, classifier.identity, args.input_size, None, threads=n
        )
        for n in (1, 2)
    }
    for n in (1, 2):  # warm up both thread counts
        torch.set_num_threads(n)
        cam.compute_cam(classifier, image_tensor, "gradcam", target)
        sessions[n](batch)
    print(
        f"cpu={cpu_model()!r} cpus_allowed={threads.affinity_cpus()} "
        f"share={threads.cpu_share().describe()} load_average={os.getloadavg()[0]:.2f} "
        f"model={args.arch} input={args.input_size} rounds={args.rounds}",
        flush=True,
    )
    results: dict = {"args": vars(args), "cpu": cpu_model(), "scenarios": {}}
    results["scenarios"]["idle"] = found = measure(
        args, classifier, image_tensor, target, batch, sessions
    )
    report(f"idle (load average {os.getloadavg()[0]:.2f})", found)
    busy = start_busy(args.busy)
    try:
        time.sleep(1.0)
        found = measure(args, classifier, image_tensor, target, batch, sessions)
    finally:
        stop_busy(busy)
    results["scenarios"]["loaded"] = found
    report(f"loaded ({args.busy} busy loop(s), load average {os.getloadavg()[0]:.2f})", found)
    pin_process({min(os.sched_getaffinity(0))})
    results["scenarios"]["restricted"] = found = measure(
        args, classifier, image_tensor, target, batch, sessions
    )
    report("restricted (affinity: one CPU)", found)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


def cpu_model() -> str:
    """lscpu's model name."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
