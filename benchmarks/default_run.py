"""The default command, as a user runs it: eager torch against the default engine, then a rerun.

    python benchmarks/default_run.py --out benchmarks/results_default_run.json

In fresh temp folders (own cache and sqlite store each) it runs `python run.py` three times,
in one process, one after the other:

1. `inference.engine=torch` (the forward passes in eager PyTorch, cold cache);
2. the default (`inference.engine=auto`: ONNX Runtime on a CPU), cold cache;
3. the default again on 2.'s cache: every explanation cached (the rerun).

For each: wall seconds, peak RSS of the process, and from its MLflow run where the time went:
start-up (process start until the run opened: imports, model load, store), explaining, writing
(CSV, overlays, per-image logging) and finishing. Targets: 2. at most 60 s, 3. at most 8 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

RUN_PY = Path(__file__).resolve().parents[1] / "run.py"
TARGETS = {"default_cold_s": 60.0, "cached_rerun_s": 8.0}
PHASES = ("seconds_loading", "seconds_explaining", "seconds_writing", "seconds_finishing")


def run_command(workdir: Path, overrides: list[str]) -> dict:
    """Run `run.py` in `workdir`; its wall seconds, peak RSS and the phases of its run."""
    args = [sys.executable, str(RUN_PY), "tracking.uri=sqlite:///mlflow.db", "progress=false"]
    log = workdir / f"run-{time.monotonic_ns()}.log"
    started_at = time.time()
    start = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen([*args, *overrides], cwd=workdir, stdout=out, stderr=out)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"run.py {' '.join(overrides)} failed; see {log}:\n{log.read_text()}")
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    experiment = client.get_experiment_by_name("xai-exp")
    run = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"])[0]
    metrics = run.data.metrics
    return {
        "overrides": overrides,
        "wall_s": round(wall, 2),
        "peak_rss_gb": round(usage.ru_maxrss / 1024**2, 2),
        "startup_s": round(run.info.start_time / 1000 - started_at, 2),
        **{phase: round(metrics.get(phase, float("nan")), 2) for phase in PHASES},
        "mean_reference_seconds": round(metrics.get("mean_reference_seconds", float("nan")), 2),
        "explanations_computed": metrics.get("explanations_computed"),
        "mean_iou": metrics.get("mean_iou"),
        "engine": run.data.tags.get("inference_engine"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the numbers as JSON")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        eager, default = Path(tmp, "torch"), Path(tmp, "default")
        eager.mkdir()
        default.mkdir()
        common = list(args.overrides)
        runs = {
            "torch_cold": run_command(
                eager, [f"cache.dir={eager / 'cache'}", "inference.engine=torch", *common]
            ),
            "default_cold": run_command(default, [f"cache.dir={default / 'cache'}", *common]),
            "cached_rerun": run_command(default, [f"cache.dir={default / 'cache'}", *common]),
        }
    for name, row in runs.items():
        print(f"{name:<14}" + " ".join(f"{k}={v}" for k, v in row.items() if k != "overrides"))
    speedup = runs["torch_cold"]["wall_s"] / runs["default_cold"]["wall_s"]
    lime = (
        runs["torch_cold"]["mean_reference_seconds"]
        / runs["default_cold"]["mean_reference_seconds"]
    )
    print(f"default vs eager torch: {speedup:.2f}x wall, LIME per image {lime:.2f}x")
    same = runs["torch_cold"]["mean_iou"] == runs["default_cold"]["mean_iou"]
    print(f"mean IoU identical with either engine: {same}")
    targets = {}
    for name, goal in TARGETS.items():
        value = runs[name.removesuffix("_s")]["wall_s"]
        targets[name] = {"value": value, "goal": f"<= {goal}", "met": value <= goal}
        print(
            f"target {name}: {value} s (goal <= {goal}) -> {'met' if value <= goal else 'NOT met'}"
        )
    result = {
        "runs": runs,
        "speedup_wall": round(speedup, 3),
        "lime_speedup": round(lime, 3),
        "same_mean_iou": same,
        "targets": targets,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
