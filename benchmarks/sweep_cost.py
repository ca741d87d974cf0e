"""What a threshold sweep costs against one run: the real commands, fresh caches, one process.

    python benchmarks/sweep_cost.py                      # defaults: bundled model, 2 images
    python benchmarks/sweep_cost.py --images 6 --lime-samples 1000 --method scorecam

Runs `run.py` once (one threshold), then `run.py -m threshold=top5,top10,top20`, each with a
fresh cache and store in a temp folder, then the same sweep again (everything cached). Prints
wall seconds and the ratios; the sweep should cost at most 1.5x one run, the rerun nothing new.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

RUN_PY = Path(__file__).resolve().parents[1] / "run.py"


def timed_run(workdir: Path, cache: Path, overrides: list[str], multirun: bool) -> float:
    """Wall seconds of one `run.py` command in `workdir`."""
    args = [sys.executable, str(RUN_PY), *(["-m"] if multirun else [])]
    args += [f"cache.dir={cache}", "tracking.uri=sqlite:///mlflow.db", "progress=false"]
    start = time.perf_counter()
    subprocess.run([*args, *overrides], cwd=workdir, check=True, capture_output=True)
    return time.perf_counter() - start


def computed(workdir: Path) -> float:
    """Explanations computed by the newest sweep's children."""
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    experiment = client.get_experiment_by_name("xai-exp")
    runs = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"])
    parent = next(r for r in runs if r.data.tags.get("role") == "sweep")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return sum(r.data.metrics.get("explanations_computed", 0) for r in children)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--lime-samples", type=int, default=1000)
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--out", type=Path, help="write the numbers as JSON")
    args = parser.parse_args()
    settings = [
        f"data.limit={args.images}",
        f"lime.num_samples={args.lime_samples}",
        f"method={args.method}",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        single, sweep = Path(tmp, "single"), Path(tmp, "sweep")
        single.mkdir()
        sweep.mkdir()
        one = timed_run(single, single / "cache", [*settings, "threshold=top10"], False)
        three = timed_run(sweep, sweep / "cache", [*settings, "threshold=top5,top10,top20"], True)
        first_computed = computed(sweep)
        rerun = timed_run(sweep, sweep / "cache", [*settings, "threshold=top5,top10,top20"], True)
        rerun_computed = computed(sweep)
    result = {
        "settings": settings,
        "one_run_s": round(one, 2),
        "sweep_3_thresholds_s": round(three, 2),
        "sweep_over_one_run": round(three / one, 3),
        "sweep_explanations_computed": first_computed,
        "rerun_s": round(rerun, 2),
        "rerun_explanations_computed": rerun_computed,
    }
    print(json.dumps(result, indent=2))
    verdict = "met" if three / one <= 1.5 and rerun_computed == 0 else "NOT met"
    ratio = three / one
    print(f"3-threshold sweep = {ratio:.2f}x one run; rerun computed {rerun_computed}: {verdict}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
