"""The smaller faults of #23.14: a read-only store, formula-like CSV cells, superpixel
parameters, all-zero LIME weights."""

from __future__ import annotations

import contextlib
import csv
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import RUN_PY, TINY_STUDY, FakeImage
from tiny_models import tiny_classifier

from xai_exp import compare as cmp
from xai_exp.app import config_dir
from xai_exp.cache import ExplanationCache
from xai_exp.config import ConfigError, LimeConfig, StudyConfig
from xai_exp.data import ImageItem
from xai_exp.explainers.superpixels import check_segmentation
from xai_exp.masks import DegenerateMapError, lime_area_matched_mask, lime_top_k_mask
from xai_exp.outputs import FORMULA_START, inert_cell, plain_cell
from xai_exp.overrides import problem
from xai_exp.pipeline import Study, run_study
from xai_exp.tracking import TrackingError, connect, unwritable


def run_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, str(RUN_PY), f"cache.dir={tmp_path}/cache", *TINY_STUDY, *overrides]
    return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def one_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("xai-exp")]
    assert len(lines) == 1, done.stderr
    return lines[0]


# --------------------------------------------------------------------------- read-only store


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    """`path` unwritable even by root (``chattr +i``); skips where chattr is refused."""
    if shutil.which("chattr") is None:
        pytest.skip("no chattr: a read-only store cannot be made here")
    made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"chattr +i refused here: {made.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=False)


@pytest.mark.parametrize("existing", [True, False], ids=["existing-db", "new-db"])
def test_a_read_only_store_is_one_fast_error(tmp_path, empty_mlflow_db, existing):
    folder = tmp_path / "store"
    folder.mkdir()
    database = folder / "mlflow.db"
    if existing:
        shutil.copyfile(empty_mlflow_db, database)
    uri = f"sqlite:///{database}"
    with immutable(database if existing else folder):
        assert unwritable(uri) is not None
        started = time.monotonic()
        with pytest.raises(TrackingError, match="is read-only") as raised:
            connect(uri, "xai-exp")
        assert time.monotonic() - started < 2
        assert str(database if existing else folder) in str(raised.value)
        assert "tracking.uri=" in str(raised.value)
        if existing:  # the command too: one line, exit 2, nothing else
            started = time.monotonic()
            line = one_line(run_cli(tmp_path, f"tracking.uri={uri}"))
            assert time.monotonic() - started < 60
            assert "is read-only" in line


def test_a_writable_store_passes(tmp_path, empty_mlflow_db):
    assert unwritable(f"sqlite:///{tmp_path / 'new.db'}") is None
    shutil.copyfile(empty_mlflow_db, tmp_path / "old.db")
    assert unwritable(f"sqlite:///{tmp_path / 'old.db'}") is None
    assert list(tmp_path.iterdir()) == [tmp_path / "old.db"]  # the probe leaves nothing
