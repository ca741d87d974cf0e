"""An installed (non-editable) xai-exp runs studies from any directory with its shipped conf/."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO_ROOT, TINY_STUDY
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

PACKAGE = REPO_ROOT / "xai_exp"


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_wheel_ships_conf_and_runs_studies_from_any_directory(tmp_path):
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    _run(
        [*pip, "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO_ROOT)],
        cwd=tmp_path,
        env=dict(os.environ),
    )
    [wheel] = wheels.glob("xai_exp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for config in REPO_ROOT.glob("conf/**/*.yaml"):
        assert f"xai_exp/{config.relative_to(REPO_ROOT).as_posix()}" in names
    modules = [p.relative_to(REPO_ROOT) for p in sorted(PACKAGE.rglob("*.py"))]
    assert [m for m in modules if m.as_posix() not in names] == []  # every wing ships

    site = tmp_path / "site"
    _run(
        [*pip, "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        tmp_path,
        dict(os.environ),
    )
    env = {**os.environ, "PYTHONPATH": str(site)}  # ahead of the editable checkout
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    package = _run(
        [sys.executable, "-c", "import xai_exp; print(xai_exp.__file__)"], elsewhere, env
    )
    assert Path(package.strip()).is_relative_to(site)
    # every module imports from the installed copy: the checkout's editable install must not
    # fill in what the wheel lacks
    dotted = [".".join(m.with_suffix("").parts) for m in modules]
    where = _run(
        [sys.executable, "-c", f"import importlib\nfor n in {dotted!r}:\n"
         "    print(importlib.import_module(n.removesuffix('.__init__')).__file__)"],
        elsewhere, env,
    )  # fmt: skip
    outside = [line for line in where.splitlines() if not Path(line).is_relative_to(site)]
    assert outside == []

    shown = _run(
        [str(site / "bin" / "xai-exp"), "run", "--cfg", "job", "method=scorecam"], elsewhere, env
    )
    assert "name: scorecam" in shown
    assert "cam_top_fraction: 0.1" in shown

    store = f"sqlite:///{elsewhere / 'mlflow.db'}"
    study = [*TINY_STUDY, f"tracking.uri={store}", f"cache.dir={tmp_path / 'cache'}"]
    _run([sys.executable, "-m", "xai_exp", "run", *study], elsewhere, env)
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("xai-exp").experiment_id])
    assert run.info.status == "FINISHED"
    assert 0 <= run.data.metrics["mean_iou"] <= 1
    assert list((elsewhere / "outputs").rglob("results.csv"))
