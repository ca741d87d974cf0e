"""Does a study's memory and per-image overhead stay flat from 20 to 2,000 large images?

Generates labelled folders of 2048x1536 JPEGs in 20 ImageNet class subfolders (once, in
--data), then runs the same cheap study (`method=gradcam lime.num_samples=10
outputs.overlays=extremes`, cache off, its own sqlite store) on a small and a large folder,
each in a fresh process, and prints per run: peak RSS, the seconds per image spent outside
explanations (loading, writing and logging, finishing), top-1 accuracy, and the ratios large /
small. Results go to --json.

    python benchmarks/data_scale.py --small 20 --large 2000
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 20
WIDTH, HEIGHT = 2048, 1536
STUDY = ["method=gradcam", "lime.num_samples=10", "outputs.overlays=extremes", "cache=off"]


def make_folder(folder: Path, count: int, seed: int = 0) -> Path:
    """`count` smooth random 2048x1536 JPEGs spread over 20 synset folders (kept if present)."""
    from timm.data import ImageNetInfo

    synsets = ImageNetInfo().label_names()[:: 1000 // CLASSES][:CLASSES]
    marker = folder / f".complete-{count}"
    if marker.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        small = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC)
        target = folder / synsets[index % CLASSES] / f"img_{index:05d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target, quality=90)
    marker.write_text("ok")
    return folder


def measure(folder: Path, work: Path) -> dict[str, float]:
    """One study in a fresh process: its peak RSS, wall time and phase seconds."""
    work.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-c",
        "import resource, subprocess, sys; "
        "code = subprocess.call(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)",
        sys.executable,
        str(ROOT / "run.py"),
        f"data.dir={folder}",
        *STUDY,
        "progress=false",
        f"tracking.uri=sqlite:///{work}/mlflow.db",
        f"hydra.run.dir={work}/out",
    ]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"study failed:\n{done.stderr[-3000:]}")
    peak_mb = int(done.stdout.strip().splitlines()[-1]) / 1024
    summary = json.loads((work / "out" / "summary.json").read_text())
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("xai-exp").experiment_id])
    n = summary["n_images"]
    outside = summary["seconds_loading"] + summary["seconds_writing"]
    outside += run.data.metrics["seconds_finishing"]
    overlays = len(list((work / "out" / "overlays").iterdir()))
    return {
        "images": n,
        "peak_rss_mb": round(peak_mb, 1),
        "wall_s": round(wall, 1),
        "explaining_s_per_image": round(summary["seconds_explaining"] / n, 4),
        "loading_s_per_image": round(summary["seconds_loading"] / n, 4),
        "writing_s_per_image": round(summary["seconds_writing"] / n, 4),
        "finishing_s_per_image": round(run.data.metrics["seconds_finishing"] / n, 4),
        "outside_explanations_s_per_image": round(outside / n, 4),
        "overlay_files": overlays,
        "top1_accuracy": summary.get("top1_accuracy"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=20)
    parser.add_argument("--large", type=int, default=2000)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "xai_scale")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results_data_scale.json")
    args = parser.parse_args()
    results = {}
    for label, count in (("small", args.small), ("large", args.large)):
        folder = make_folder(args.data / f"images_{count}", count)
        with tempfile.TemporaryDirectory() as work:
            results[label] = measure(folder, Path(work))
        print(label, json.dumps(results[label]), flush=True)
    small, large = results["small"], results["large"]
    results["large_minus_small_peak_rss_mb"] = round(large["peak_rss_mb"] - small["peak_rss_mb"], 1)
    results["outside_explanations_ratio_large_to_small"] = round(
        large["outside_explanations_s_per_image"] / small["outside_explanations_s_per_image"], 2
    )
    print(
        f"peak RSS {small['peak_rss_mb']:.0f} MB ({small['images']} images) -> "
        f"{large['peak_rss_mb']:.0f} MB ({large['images']} images): "
        f"+{results['large_minus_small_peak_rss_mb']:.0f} MB"
    )
    print(
        f"seconds per image outside explanations: {small['outside_explanations_s_per_image']:.3f}"
        f" -> {large['outside_explanations_s_per_image']:.3f} "
        f"(ratio {results['outside_explanations_ratio_large_to_small']})"
    )
    args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
