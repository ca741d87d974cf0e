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

from xai_exp.app.hydra_app import config_dir
from xai_exp.app.overrides import problem
from xai_exp.cache import ExplanationCache
from xai_exp.compare import comparison as cmp
from xai_exp.config import ConfigError, LimeConfig, StudyConfig
from xai_exp.data.annotations import _is_number  # the one "is this text a number" test
from xai_exp.data.images import ImageItem
from xai_exp.evaluate.masks import DegenerateMapError, lime_area_matched_mask, lime_top_k_mask
from xai_exp.explain.superpixels import check_segmentation
from xai_exp.outputs.writer import FORMULA_START, inert_cell, plain_cell
from xai_exp.study.pipeline import Study, run_study
from xai_exp.track.runs import TrackingError, connect, unwritable


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


# --------------------------------------------------------------------------- CSV cells


def test_inert_cells_round_trip():
    for value in ["=1+1", "+cmd", "-stem", "@SUM(A1)", "\tx", "\rx", "'=x", "''-y"]:
        assert inert_cell(value).startswith("'")
        assert plain_cell(inert_cell(value)) == value
    for value in ["plain", "-0.5", "+1e-3", "'quoted", 0.5, None]:
        assert inert_cell(value) == value
        assert plain_cell(value) == value


def test_artifact_stems_and_compare_csvs_never_start_like_a_formula(tracking_store, make_study_run):
    store = tracking_store
    images = [FakeImage("=HYPERLINK(1)", 0.8, stem="-cmd"), FakeImage("@b", 0.2, stem="+b")]
    for fraction in (0.1, 0.2):
        run = make_study_run(store.client, store.experiment_id, images, cam_top_fraction=fraction)
        local = Path(store.client.download_artifacts(run.run_id, "results.csv", str(store.root)))
        with local.open(encoding="utf-8") as file:  # as ResultsWriter writes it
            rows = [{k: inert_cell(v) for k, v in row.items()} for row in csv.DictReader(file)]
        assert rows[0]["artifact_stem"] == "'-cmd"
        with local.open("w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        store.client.log_artifact(run.run_id, str(local))
    out = store.root / "report"
    comparison = cmp.compare(store.uri, out_dir=out)
    assert sorted(comparison.images["image"].unique()) == ["=HYPERLINK(1)", "@b"]  # read back
    page = (out / cmp.HTML_NAME).read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") >= 3  # the overlays -cmd.png, +b.png found
    written = [out / name for name in (cmp.CSV_NAME, cmp.GRID_NAME, cmp.PAIRED_NAME)]
    written.append(out / cmp.MATRIX_NAME)
    texts = []
    for path in written:
        with path.open(encoding="utf-8", newline="") as file:
            cells = [cell for row in csv.reader(file) for cell in row]
        texts += cells
        starts = [cell for cell in cells if cell.startswith(FORMULA_START)]
        assert [c for c in starts if not _is_number(c)] == [], path.name
    assert "'=HYPERLINK(1)" in texts


# --------------------------------------------------------------------------- superpixels


@pytest.mark.parametrize(
    ("algorithm", "params", "said"),
    [
        ("quickshift", {"kernel_size": -3}, "kernel_size=-3 must be > 0"),
        ("quickshift", {"max_dist": 0}, "max_dist=0 must be > 0"),
        ("quickshift", {"ratio": 1.5}, "ratio=1.5 must be in [0, 1]"),
        ("slic", {"n_segments": 0}, "n_segments=0 must be >= 1"),
        ("slic", {"compactness": -1.0}, "compactness=-1.0 must be > 0"),
        ("felzenszwalb", {"scale": 0}, "scale=0 must be > 0"),
        ("felzenszwalb", {"min_size": -1}, "min_size=-1 must be >= 0"),
        ("felzenszwalb", {"sigma": float("nan")}, "sigma=nan must be"),
    ],
)
def test_superpixel_numbers_outside_their_range_are_config_errors(algorithm, params, said):
    with pytest.raises(ConfigError, match=None) as raised:
        check_segmentation(algorithm, params)
    assert said in str(raised.value)
    assert "\n" not in str(raised.value)


def test_the_presets_superpixel_numbers_pass():
    check_segmentation("quickshift", {"kernel_size": 4, "max_dist": 200, "ratio": 0.2})
    check_segmentation("slic", {"n_segments": 50, "compactness": 10, "sigma": 1, "start_label": 0})
    check_segmentation("felzenszwalb", {"scale": 100, "sigma": 0.5, "min_size": 50})


def test_a_negative_kernel_size_is_one_line_before_any_compute(tmp_path):
    line = one_line(run_cli(tmp_path, "tracking=none", "lime.segmentation.params.kernel_size=-3"))
    assert "kernel_size=-3 must be > 0 for quickshift" in line
    assert not (tmp_path / "cache").exists()  # nothing computed


def test_an_unset_superpixel_parameter_without_plus_names_the_plus():
    conf = config_dir()
    said = problem(["lime.segmentation.params.sigma=1"], conf)
    assert said is not None
    assert "add it with +lime.segmentation.params.sigma=1" in said
    said = problem(["lime.segmentation.params.foo=1"], conf)
    assert said is not None
    assert "quickshift takes no 'foo'" in said
    assert "+lime.segmentation.params.NAME=VALUE" in said
    said = problem(["lime=slic", "lime.segmentation.params.max_dist=3"], conf)
    assert said is not None
    assert "slic takes no 'max_dist'" in said
    assert problem(["lime.segmentation.params.kernel_size=3"], conf) is None  # the preset's
    assert problem(["+lime.segmentation.params.sigma=1"], conf) is None  # added on purpose
    assert problem(["lime=slic", "lime.segmentation.params.n_segments=9"], conf) is None


def test_an_unset_superpixel_parameter_is_one_line_from_the_command(tmp_path):
    line = one_line(run_cli(tmp_path, "tracking=none", "lime.segmentation.params.foo=1"))
    assert "+lime.segmentation.params" in line


# --------------------------------------------------------------------------- LIME weights


@pytest.mark.parametrize("value", [0.0, 1e-32, -1e-20])
def test_lime_weights_all_zero_are_degenerate(value):
    segments = np.repeat(np.arange(4), 4).reshape(4, 4)
    weights = np.full(4, value)
    with pytest.raises(DegenerateMapError, match="LIME weights are all zero"):
        lime_top_k_mask(segments, weights, 2)
    with pytest.raises(DegenerateMapError, match="LIME weights are all zero"):
        lime_area_matched_mask(segments, weights, 4)
    assert lime_top_k_mask(segments, np.array([1e-6, 0, 0, 0]), 2).sum() == 4  # small is fine


def test_a_black_image_is_flagged_not_compared(tmp_path):
    lime = LimeConfig(num_samples=40, batch_size=16)  # quickshift: one superpixel, weight 1e-32
    lime.segmentation.params = {"kernel_size": 4, "max_dist": 200, "ratio": 0.2}
    study = Study(
        StudyConfig(lime=lime, progress=False), tiny_classifier(), ExplanationCache(tmp_path)
    )
    black = np.zeros((32, 32, 3), np.uint8)
    [result] = run_study(study, [ImageItem("black", "black", black, "h0", "black")], progress=False)
    assert result.status.value == "flagged", result.reason
    assert "LIME weights are all zero" in result.reason
    assert result.iou is None
