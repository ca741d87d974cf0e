"""The numbers the move into wings and the explainer registry must not change.

`tests/pinned/*.csv` were written by the code before both (commit aca026f) with the commands
below; the same commands today must give the same per-image predictions, masks and IoU. The
seed study runs with random ResNet-18 weights (seeded, as `model.weights=null` always is: the
ImageNet weights would need a download) and fewer LIME samples so that it fits the suite.
Values are compared to 1e-6: another CPU may round a float differently, never by more.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO_ROOT, RUN_PY

PINNED = REPO_ROOT / "tests" / "pinned"
pytestmark = pytest.mark.slow


def run(tmp_path: Path, *args: str, multirun: bool = False) -> None:
    environ = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    command = [sys.executable, str(RUN_PY), *(["-m"] if multirun else [])]
    command += ["tracking=none", f"cache.dir={tmp_path}/cache"]
    done = subprocess.run(
        [*command, "lime.num_samples=100", "progress=false", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env=environ,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def assert_same(found: pd.DataFrame, pinned: pd.DataFrame) -> None:
    found = found[pinned.columns].reset_index(drop=True)
    for column in pinned.columns:
        if pinned[column].dtype.kind == "f":
            assert found[column].to_numpy() == pytest.approx(
                pinned[column].to_numpy(), abs=1e-6, nan_ok=True
            ), column
        else:
            assert found[column].tolist() == pinned[column].tolist(), column


def test_the_default_run_gives_the_pinned_per_image_iou(tmp_path):
    run(tmp_path, "hydra.run.dir=out", "data.limit=3")  # the first three of the six pinned
    pinned = pd.read_csv(PINNED / "default_run.csv").head(3)
    assert_same(pd.read_csv(tmp_path / "out" / "results.csv"), pinned)


def test_the_seed_study_gives_the_pinned_per_image_iou(tmp_path):
    pinned = pd.read_csv(PINNED / "seed_study.csv")
    pinned = pinned[pinned.image == "astronaut"]  # the first of the three pinned images
    run(
        tmp_path,
        "experiment=seed_study",
        "model.weights=null",
        "data.limit=1",
        "hydra.sweep.dir=sweep",
        multirun=True,
    )
    for job, method in enumerate(["gradcam", "scorecam", "ablationcam"]):
        found = pd.read_csv(tmp_path / "sweep" / str(job) / "results.csv")
        found.insert(0, "method", method)
        assert_same(found, pinned[pinned.method == method])
