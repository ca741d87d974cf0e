"""Real datasets: labelled layouts, manifests, streaming, shards, overlays at scale, resume."""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, TINY_STUDY, study_command
from mlflow.tracking import MlflowClient
from PIL import Image
from tiny_models import smooth_image, tiny_classifier

from xai_exp.app.hydra_app import compose_config
from xai_exp.app.job import JobContext, execute
from xai_exp.cache import ExplanationCache
from xai_exp.config import ConfigError, DataConfig, honour_data_dir, ignored_overrides
from xai_exp.data import images as data_module
from xai_exp.data.images import ImageItem, ImageSet, list_folder, open_images, read_manifest, select
from xai_exp.data.labels import ClassIndex, imagenet_synsets
from xai_exp.evaluate.results import ImageResult, Status, summary_metrics
from xai_exp.models.classifier import imagenet_labels
from xai_exp.outputs import plots
from xai_exp.outputs.writer import OverlayPlan
from xai_exp.study.pipeline import Study, run_study
from xai_exp.track.runs import RunLogger

GOLDFISH = "n01443537"  # class 1 of ImageNet-1k
TABBY = 281


def _png(path: Path, seed: int = 0, size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(smooth_image(size, seed)).save(path)
    return path


@pytest.fixture(scope="module")
def imagenet() -> ClassIndex:
    return ClassIndex(imagenet_labels())


def _true_classes(images: ImageSet, classes: ClassIndex) -> dict[str, int | None]:
    return {f.name: None if f.label is None else classes.lookup(f.label) for f in images.files}


# --------------------------------------------------------------------------- labels


def test_each_layout_gives_the_true_class(tmp_path, imagenet):
    _png(tmp_path / "goldfish" / "a.png")  # ImageFolder: class name
    _png(tmp_path / "tabby_cat" / "sub" / "b.png")  # nested under a class folder, a lemma
    _png(tmp_path / GOLDFISH / "ILSVRC2012_val_00000001.png")  # ImageNet-val: synset folder
    _png(tmp_path / "n02123045_10007.png")  # ImageNet-train naming: synset in the file name
    _png(tmp_path / "plain.png")  # no label
    images = list_folder(tmp_path)
    assert _true_classes(images, imagenet) == {
        "goldfish/a.png": 1,
        f"{GOLDFISH}/ILSVRC2012_val_00000001.png": 1,
        "n02123045_10007.png": imagenet_synsets().index("n02123045"),
        "plain.png": None,
        "tabby_cat/sub/b.png": TABBY,
    }
    assert {f.name: f.label_from for f in images.files}["n02123045_10007.png"] == "synset"


def test_manifest_labels_top_level_files_and_loses_to_class_folders(tmp_path, imagenet):
    _png(tmp_path / "ILSVRC2012_val_00000001.JPEG.png")
    _png(tmp_path / "x.png")
    _png(tmp_path / "goldfish" / "y.png")
    manifest = tmp_path / "LOC_val_solution.csv"  # ImageNet's own format: stem, synset + boxes
    manifest.write_text(
        "ImageId,PredictionString\n"
        f"ILSVRC2012_val_00000001.JPEG,{GOLDFISH} 10 20 30 40\n"
        "x.png,tabby\n"
        "goldfish/y.png,tabby\n"
        "gone.png,tabby\n"
    )
    images = list_folder(tmp_path, manifest=manifest)
    assert _true_classes(images, imagenet) == {
        "ILSVRC2012_val_00000001.JPEG.png": 1,
        "x.png": TABBY,
        "goldfish/y.png": 1,  # the class folder wins; the conflict is recorded
    }
    assert images.label_conflicts == ["goldfish/y.png"]
    assert [(s.path, s.reason) for s in images.skipped] == [
        ("gone.png", "named in the manifest, not found in the data folder")
    ]
    assert "LOC_val_solution.csv" not in {Path(s.path).name for s in images.skipped}


def test_manifest_without_header(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("a.png,goldfish\nb/c.png,tabby\n")
    assert read_manifest(manifest) == {"a.png": "goldfish", "b/c.png": "tabby"}


@pytest.mark.parametrize(
    ("content", "problem"),
    [(b"\x89PNG\r\n\x1a\n\x00\x00", "binary data"), (b"just one column\n", "row 1 has one column")],
)
def test_a_label_file_that_is_not_csv_is_skipped_and_the_study_goes_on(tmp_path, content, problem):
    _png(tmp_path / "images" / "goldfish" / "a.png")
    manifest = tmp_path / "labels.csv"
    manifest.write_bytes(content)
    images = list_folder(tmp_path / "images", manifest=manifest)
    assert [f.name for f in images.files] == ["goldfish/a.png"]
    [skipped] = images.skipped
    assert skipped.path == str(manifest.resolve())
    assert "is not a CSV of file,label rows" in skipped.reason
    assert problem in skipped.reason


def test_labels_unknown_or_ambiguous_map_to_none_with_a_reason(imagenet):
    assert imagenet.lookup("n99999999") is None
    assert "not an ImageNet-1k synset" in imagenet.why_unknown("n99999999")
    assert imagenet.lookup("2024") is None
    assert imagenet.why_unknown("2024") == "no class has this name"
    small = ClassIndex(["cat", "dog", "Cat"])
    assert small.lookup("DOG") == 1
    assert small.lookup("cat") is None
    assert small.why_unknown("cat") == "more than one class has this name"
    assert small.lookup(GOLDFISH) is None  # not an ImageNet model


def test_true_class_correct_and_top1_accuracy():
    classifier = tiny_classifier()
    images = [smooth_image(seed=s) for s in range(4)]
    predicted = [int(np.argmax(classifier.predict(view)[0])) for view in images]
    labels = [
        f"class{predicted[0]}",  # right
        f"class{(predicted[1] + 1) % 10}",  # wrong
        "no such class",  # unknown: no true class, not counted
        None,  # unlabelled
    ]
    items = [
        ImageItem(f"i{n}", f"i{n}", image, f"hash{n}", "", label)
        for n, (image, label) in enumerate(zip(images, labels, strict=True))
    ]
    study = Study(_tiny_config(), classifier, ExplanationCache(enabled=False))
    results = run_study(study, items, progress=False)
    assert [r.true_class for r in results] == [predicted[0], (predicted[1] + 1) % 10, None, None]
    assert [r.true_label for r in results][2:] == ["no such class", ""]
    assert [r.values.get("correct") for r in results] == [True, False, None, None]
    assert summary_metrics(results)["top1_accuracy"] == 0.5
    assert "top1_accuracy" not in summary_metrics(results[2:])  # no labels: no accuracy


def test_target_class_true_explains_the_true_class_and_flags_unlabelled_images():
    classifier = tiny_classifier()
    cfg = _tiny_config()
    cfg.method.target_class = True  # what Hydra makes of method.target_class=true
    items = [
        ImageItem("a", "a", smooth_image(seed=1), "h1", "", "class7"),
        ImageItem("b", "b", smooth_image(seed=2), "h2", "", None),
    ]
    labelled, unlabelled = run_study(Study(cfg, classifier, ExplanationCache(enabled=False)), items)
    assert labelled.target_class == 7
    assert "cam_seconds" in labelled.values  # explained (its map may still be flagged)
    assert "true class" not in labelled.reason
    assert unlabelled.status == Status.FLAGGED
    assert "no known true class" in unlabelled.reason
    assert unlabelled.predicted_class >= 0


def _tiny_config():
    from xai_exp.config import LimeConfig, StudyConfig

    lime = LimeConfig(num_samples=20, batch_size=20)
    lime.segmentation.algorithm = "slic"
    lime.segmentation.params = {"n_segments": 9, "compactness": 10, "start_label": 0}
    return StudyConfig(lime=lime, progress=False)


# --------------------------------------------------------------------------- streaming


def test_images_are_decoded_one_at_a_time_while_the_study_runs(tmp_path, monkeypatch):
    for n in range(8):
        _png(tmp_path / f"{n}.png", seed=n)
    decoded: list[str] = []
    real = data_module._load_with_hash
    monkeypatch.setattr(
        data_module,
        "_load_with_hash",
        lambda path, *a: decoded.append(path.name) or real(path, *a),
    )
    images = list_folder(tmp_path)
    assert decoded == []  # listing reads nothing
    stream = iter(images)
    first = next(stream)
    assert first.name == "0.png"
    assert len(decoded) <= images.prefetch + 2  # a small prefetch, not the whole folder
    assert [item.name for item in stream] == [f"{n}.png" for n in range(1, 8)]


def test_a_huge_sparse_file_is_skipped_without_being_read(tmp_path, monkeypatch):
    _png(tmp_path / "small.png")
    with (tmp_path / "huge.png").open("wb") as file:
        file.truncate(30 * 2**30)  # 30 GB, sparse: nothing on disk
    opened: list[str] = []
    real = data_module._open_regular
    monkeypatch.setattr(
        data_module, "_open_regular", lambda path: opened.append(path.name) or real(path)
    )
    images = list_folder(tmp_path, max_file_mb=200)
    items = list(images)
    assert [item.name for item in items] == ["small.png"]
    assert opened == ["small.png"]
    [skipped] = images.skipped
    assert Path(skipped.path).name == "huge.png"
    assert "30,720 MB, above data.max_file_mb=200" in skipped.reason


# --------------------------------------------------------------------------- data faults (#23)


def _skips(images: ImageSet) -> dict[str, str]:
    return {Path(s.path).name: s.reason for s in images.skipped}


def test_a_fifo_named_png_is_skipped_never_opened(tmp_path):
    _png(tmp_path / "a.png")
    os.mkfifo(tmp_path / "x.png")  # opening it would wait for a writer forever
    images = list_folder(tmp_path)
    assert [item.name for item in images] == ["a.png"]
    assert _skips(images) == {"x.png": "not a regular file (a named pipe (FIFO)); only regular "
                              "files are read"}  # fmt: skip


def test_a_file_that_turns_into_a_fifo_after_listing_is_refused_at_once(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "x.png")
    images = list_folder(tmp_path)
    (tmp_path / "x.png").unlink()
    os.mkfifo(tmp_path / "x.png")
    started = time.monotonic()
    assert [item.name for item in images] == ["a.png"]
    assert time.monotonic() - started < 10
    assert "not a regular file (a named pipe (FIFO))" in _skips(images)["x.png"]
    with pytest.raises(data_module.ImageLoadError, match="not a regular file"):
        data_module.load_image(tmp_path / "x.png")


def test_a_read_that_hangs_is_skipped_after_the_time_bound(tmp_path, monkeypatch):
    for n in range(4):
        _png(tmp_path / f"{n}.png", seed=n)
    hung = threading.Event()
    real = data_module._load_with_hash

    def load(path, *args):
        if path.name == "1.png":
            hung.wait(30)  # a read on a hung network filesystem
        return real(path, *args)

    monkeypatch.setattr(data_module, "_load_with_hash", load)
    images = list_folder(tmp_path, read_timeout_s=0.5)
    started = time.monotonic()
    try:
        assert [item.name for item in images] == ["0.png", "2.png", "3.png"]
    finally:
        hung.set()
    assert time.monotonic() - started < 10
    assert "not read within data.read_timeout_s=0.5 s" in _skips(images)["1.png"]


def test_a_process_with_a_read_stuck_for_good_still_exits(tmp_path):
    # The decode thread is a daemon: a read blocked forever cannot hold the exit (SIGTERM).
    _png(tmp_path / "a.png")
    script = (
        "import sys, threading\n"
        "from xai_exp.data import images as data\n"
        "data._load_with_hash = lambda *a: threading.Event().wait()\n"
        "images = data.list_folder(sys.argv[1], read_timeout_s=0.5)\n"
        "print(len(list(images)), len(images.skipped))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "1"]


def test_a_symlink_to_the_root_is_not_walked(tmp_path):
    folder = tmp_path / "images"
    _png(folder / "a.png")
    _png(folder / "cats" / "b.png")
    (folder / "root").symlink_to("/")
    (folder / "outside.png").symlink_to(_png(tmp_path / "elsewhere" / "o.png"))
    (folder / "zlink").symlink_to(folder / "cats")  # inside the folder: followed once
    started = time.monotonic()
    images = list_folder(folder)
    assert time.monotonic() - started < 10
    assert [f.name for f in images.files] == ["a.png", "cats/b.png"]
    skips = _skips(images)
    assert set(skips) == {"root", "outside.png"}
    assert skips["root"] == (
        "symlink to /, outside the data folder (not followed; "
        "data.follow_external_symlinks=true follows it)"
    )
    (folder / "root").unlink()
    followed = list_folder(folder, follow_external_symlinks=True)  # asked for: followed
    assert [f.name for f in followed.files] == ["a.png", "cats/b.png", "outside.png"]


def test_a_file_name_that_is_not_utf8_is_read_and_named_with_escapes(tmp_path):
    _png(tmp_path / "a.png")
    bad = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"bad\xff.png"))
    Image.fromarray(smooth_image(16, 3)).save(bad, format="PNG")
    (Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"notes\xfe.txt")))).write_text("x")
    images = list_folder(tmp_path)
    items = list(images)
    assert [item.name for item in items] == ["a.png", "bad\\xff.png"]
    assert items[1].source.endswith("bad\\xff.png")
    assert images.stems == ["a", "bad_xff"]
    [skipped] = images.skipped
    assert skipped.path.endswith("notes\\xfe.txt")
    assert "(.txt file;" in skipped.reason
    for text in (items[1].name, items[1].source, skipped.path, skipped.reason):
        text.encode("utf-8")  # every name can be written to a CSV, a log line, MLflow
    assert 0 <= data_module.shard_of(items[1].name, 4) < 4


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG file whose header declares width x height pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def test_an_image_above_the_pixel_budget_is_skipped_from_its_header(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "huge.png").write_bytes(_png_declaring(30000, 30000))  # 900 MP, 200 bytes
    images = list_folder(tmp_path)
    assert [item.name for item in images] == ["a.png"]
    reason = _skips(images)["huge.png"]
    assert reason.startswith("image above the pixel budget data.max_pixels=89,478,485 (not decoded")
    assert "900000000 pixels" in reason
    (tmp_path / "huge.png").write_bytes(_png_declaring(10000, 10000))  # 100 MP: our own check
    budget = list_folder(tmp_path, max_pixels=50_000_000)
    assert [item.name for item in budget] == ["a.png"]
    assert _skips(budget)["huge.png"] == (
        "PNG of 10000x10000 = 100,000,000 pixels, above the pixel budget "
        "data.max_pixels=50,000,000 (not decoded)"
    )
    lowered = list_folder(tmp_path, max_pixels=100)  # 16x16 = 256 pixels
    assert list(lowered) == []
    assert "above the pixel budget data.max_pixels=100" in _skips(lowered)["a.png"]


PEAK_RSS = (
    "import sys\n"
    "from xai_exp.data import images as data\n"
    "budget = int(sys.argv[3]) if len(sys.argv) > 3 else 89_478_485\n"
    "images = data.list_folder(sys.argv[1], max_file_mb=float(sys.argv[2]), max_pixels=budget)\n"
    "names = [item.name for item in images]\n"
    "status = open('/proc/self/status').read().split('VmHWM:')[1]\n"  # ru_maxrss survives exec
    "peak = int(status.split()[0]) // 1024\n"
    "print(peak, names, [s.reason for s in images.skipped])\n"
)


def _peak_rss_mb(folder: Path, max_file_mb: float = 200, *budget: int) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, str(folder), str(max_file_mb), *map(str, budget)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert done.returncode == 0, done.stderr
    peak, rest = done.stdout.split(" ", 1)
    return int(peak), rest


def test_a_huge_file_that_max_file_mb_allows_costs_no_memory(tmp_path):
    _png(tmp_path / "a.png")
    with (tmp_path / "big.png").open("wb") as file:  # a small PNG, then 1 GB of (sparse) zeros
        file.write((tmp_path / "a.png").read_bytes())
        file.truncate(2**30)
    peak, shown = _peak_rss_mb(tmp_path, max_file_mb=10**6)
    assert shown.startswith("['a.png', 'big.png'] []")
    assert peak < 400, f"peak RSS {peak} MB"  # streamed: the file is never held whole


def _float_tiff_of_zeros(path: Path, width: int, height: int, rows: int = 64) -> Path:
    """A deflate-compressed float32 TIFF of zeros, written without holding its pixels."""
    strips = -(-height // rows)
    strip = zlib.compress(bytes(rows * width * 4), 9)  # every strip the same (the last longer)
    entries = [  # tag, type (3 SHORT, 4 LONG), count, value or offset
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 1, 32),
        (259, 3, 1, 8),  # deflate
        (262, 3, 1, 1),
        (273, 4, strips, 0),  # strip offsets: patched below
        (277, 3, 1, 1),
        (278, 4, 1, rows),
        (279, 4, strips, 0),  # strip byte counts
        (339, 3, 1, 3),  # IEEE float
    ]
    ifd_size = 2 + 12 * len(entries) + 4
    offsets_at = 8 + ifd_size
    counts_at = offsets_at + 4 * strips
    data_at = counts_at + 4 * strips
    values = {273: offsets_at, 279: counts_at}
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        packed = struct.pack(
            "<I" if kind == 4 else "<HH", values.get(tag, value), *([] if kind == 4 else [0])
        )
        ifd += struct.pack("<HHI", tag, kind, count) + packed
    ifd += struct.pack("<I", 0)
    offsets = struct.pack(f"<{strips}I", *(data_at + n * len(strip) for n in range(strips)))
    counts = struct.pack(f"<{strips}I", *([len(strip)] * strips))
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + offsets + counts + strip * strips)
    return path


def test_a_big_float_tiff_decodes_within_its_pixel_budget(tmp_path):
    _png(tmp_path / "a.png")
    tiff = _float_tiff_of_zeros(tmp_path / "big.tif", 9400, 9400)  # 88 MP, 353 MB as float32
    assert tiff.stat().st_size < 2 * 2**20  # small on disk
    with Image.open(tiff) as img:
        assert (img.mode, img.size) == ("F", (9400, 9400))
    peak, shown = _peak_rss_mb(tmp_path)  # allowed by the default budget: decoded, shrunk
    assert shown.startswith("['a.png', 'big.tif'] []")
    assert peak < 800, f"peak RSS {peak} MB"  # the float32 pixels once (~515), not 3.9 GB
    peak, shown = _peak_rss_mb(tmp_path, 200, 50_000_000)  # above a lowered budget: skipped
    assert shown.startswith("['a.png'] ['TIFF of 9400x9400 = 88,360,000 pixels, above")
    assert peak < 200, f"peak RSS {peak} MB"


def test_a_deep_image_is_shrunk_before_scaling_and_keeps_its_scaling(tmp_path):
    values = np.tile(np.linspace(0, 65535, 300).astype(np.uint16), (100, 1))
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)  # I;16, 300x100
    small = data_module.load_image(path, max_side=100)
    assert small.shape == (34, 100, 3)
    assert small[:, 0].max() <= 3
    assert small[:, -1].min() >= 250
    floats = tmp_path / "f.tif"
    Image.fromarray(np.tile(np.linspace(0, 1, 300, dtype=np.float32), (100, 1))).save(floats)
    shrunk = data_module.load_image(floats, max_side=100)
    assert shrunk.shape == (34, 100, 3)
    assert shrunk[0, -1, 0] >= 250


# --------------------------------------------------------------------------- shards


def test_shards_partition_the_images_exactly(tmp_path):
    for n in range(40):
        _png(tmp_path / f"c{n % 5}" / f"{n}.png", seed=n)
    (tmp_path / "c0" / "notes.txt").write_text("x")
    everything = list_folder(tmp_path)
    parts = [select(everything, num_shards=4, shard=k) for k in range(4)]
    names = [f.name for part in parts for f in part.files]
    assert sorted(names) == sorted(f.name for f in everything.files)  # none lost or doubled
    assert all(len(part) > 0 for part in parts)
    assert sum(len(part.skipped) for part in parts) == 1  # the non-image is reported once
    again = [select(list_folder(tmp_path), num_shards=4, shard=k) for k in range(4)]
    assert [[f.name for f in p.files] for p in again] == [[f.name for f in p.files] for p in parts]
    # data.limit defines the study first; its shards partition it
    limited = [select(everything, limit=10, num_shards=3, shard=k) for k in range(3)]
    assert sorted(f.name for p in limited for f in p.files) == sorted(
        f.name for f in everything.files[:10]
    )


@pytest.mark.slow
def test_a_sharded_sweep_pools_into_one_compare_row(tmp_path):
    folder = tmp_path / "images"
    for n in range(6):
        _png(folder / ("goldfish" if n % 2 else "tabby") / f"{n}.png", seed=n, size=32)
    tiny = [o for o in TINY_STUDY if not o.startswith("data.limit")]
    args = study_command(
        tmp_path,
        *tiny,
        f"data.dir={folder}",
        "lime.num_samples=10",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "data.num_shards=2",
        "data.shard=0,1",
        multirun=True,
    )
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [experiment] = [e for e in client.search_experiments() if e.name == "xai-exp"]
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2
    assert sum(r.data.metrics["n_images"] for r in children) == 6
    out = tmp_path / "cmp"
    compared = subprocess.run(
        [
            *args[:1],
            "-m",
            "xai_exp",
            "compare",
            "--tracking-uri",
            f"sqlite:///{tmp_path}/mlflow.db",
            "--out",
            str(out),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert compared.returncode == 0, compared.stderr
    table = list(csv.DictReader(io.StringIO((out / "comparison.csv").read_text())))
    assert len(table) == 1  # one setting: the shards pooled
    assert table[0]["runs"] == "2"
    assert table[0]["images"] == "6"  # each image once
    accuracy = [float(r.data.metrics["top1_accuracy"]) for r in children]
    assert all(0 <= a <= 1 for a in accuracy)


# --------------------------------------------------------------------------- overrides


def test_data_dir_alone_is_honoured(tmp_path):
    _png(tmp_path / "mine.png")
    overrides = [f"data.dir={tmp_path}"]
    cfg = honour_data_dir(compose_config(overrides), overrides)
    assert cfg.data.source == "folder"
    assert [f.name for f in open_images(cfg.data).files] == ["mine.png"]
    assert ignored_overrides(cfg, overrides) == []


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data=bundled", "data.dir=/x"], "data.dir is ignored with data=bundled"),
        (["data.manifest=/x.csv"], "data.manifest is ignored here"),
        (["metrics.steps=5"], "deletion/insertion is off; add metrics=faithfulness"),
        (["tracking.enabled=false", "tracking.uri=sqlite:///x.db"], "tracking is off"),
        (["data.shard=0"], "data.num_shards is 1"),
        (["data.num_shards=2"], "data.num_shards=2 without data.shard runs shard 0 only"),
        (["lime.seeds=[0,1]", "lime.seed=3"], "lime.seeds lists the seeds"),
        (
            ["metrics=faithfulness", "metrics.protocol=rise", "metrics.steps=5"],
            "metrics.protocol=rise fixes its own steps",
        ),
    ],
)
def test_an_override_the_config_would_ignore_is_an_error(tmp_path, overrides, expected):
    cfg = honour_data_dir(compose_config(overrides), overrides)
    assert any(expected in problem for problem in ignored_overrides(cfg, overrides))
    context = JobContext(output_dir=tmp_path, task_overrides=tuple(overrides))
    with pytest.raises(ConfigError, match=expected):
        execute(cfg, context)
    assert not (tmp_path / "results.csv").exists()


def test_ignored_overrides_in_a_sweep_are_warnings(tmp_path, caplog):
    from xai_exp.app.job import check_overrides

    overrides = ("metrics.steps=5",)
    cfg = compose_config(overrides)
    context = JobContext(output_dir=tmp_path, multirun=True, task_overrides=overrides)
    with caplog.at_level(logging.WARNING, logger="xai_exp"):
        check_overrides(cfg, context)
    assert "metrics.steps is ignored here" in caplog.text


# --------------------------------------------------------------------------- a labelled study


@pytest.mark.slow
def test_a_labelled_folder_study_logs_accuracy_and_names_every_bad_input(tmp_path, caplog):
    folder = tmp_path / "images"
    for n in range(3):
        _png(folder / "goldfish" / f"g{n}.png", seed=n, size=32)
    _png(folder / "tabby" / "t0.png", seed=5, size=32)
    (folder / "tabby" / "notes.txt").write_text("a non-image in a class folder")
    (folder / "empty_class").mkdir()
    _png(folder / "mystery_class" / "m.png", seed=7, size=32)
    _png(folder / "top.png", seed=8, size=32)
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    manifest = tmp_path / "labels.csv"
    manifest.write_text("file,label\ntop.png,goldfish\nmissing.png,tabby\n")
    overrides = [
        *[o for o in TINY_STUDY if not o.startswith(("data.limit", "progress"))],
        f"data.dir={folder}",
        f"data.manifest={manifest}",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"cache.dir={tmp_path}/cache",
        "lime.num_samples=10",
        "progress=false",
    ]
    cfg = honour_data_dir(compose_config(overrides), overrides)
    with caplog.at_level(logging.WARNING, logger="xai_exp"):
        execute(cfg, JobContext(output_dir=tmp_path / "out", task_overrides=tuple(overrides)))
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert {r["image"]: r["true_class"] for r in rows} == {
        "goldfish/g0.png": "1",
        "goldfish/g1.png": "1",
        "goldfish/g2.png": "1",
        "mystery_class/m.png": "",
        "tabby/t0.png": str(TABBY),
        "top.png": "1",
    }
    skipped = {
        Path(r["path"]).name: r["reason"]
        for r in csv.DictReader((tmp_path / "out" / "skipped_files.csv").open())
    }
    assert set(skipped) == {"notes.txt", "empty_class", "missing.png", "broken.png"}
    for name in ("notes.txt", "empty_class", "missing.png", "broken.png", "'mystery_class'"):
        assert sum(name in line for line in caplog.text.splitlines()) == 1, name
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("xai-exp").experiment_id])
    labelled = [r for r in rows if r["true_class"]]
    correct = [r["correct"] == "True" for r in labelled]
    assert math.isclose(run.data.metrics["top1_accuracy"], sum(correct) / len(correct))
    assert run.data.metrics["n_skipped_files"] == 4
    assert run.data.metrics["n_images"] == 6


@pytest.mark.slow
def test_rerunning_an_interrupted_study_computes_only_the_unfinished_images(tmp_path, monkeypatch):
    overrides = [
        *TINY_STUDY,
        "data.limit=3",
        "lime.num_samples=10",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"cache.dir={tmp_path}/cache",
    ]
    real = Study.explain
    calls = []

    def interrupted(self, item):
        calls.append(item.name)
        if len(calls) == 2:
            raise KeyboardInterrupt("Ctrl-C")
        return real(self, item)

    monkeypatch.setattr(Study, "explain", interrupted)
    with pytest.raises(KeyboardInterrupt):
        execute(compose_config(overrides), JobContext(output_dir=tmp_path / "first"))
    monkeypatch.setattr(Study, "explain", real)
    execute(compose_config(overrides), JobContext(output_dir=tmp_path / "second"))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs(
        [client.get_experiment_by_name("xai-exp").experiment_id], order_by=["start_time"]
    )
    assert [r.info.status for r in runs] == ["KILLED", "FINISHED"]
    resumed = runs[1].data.metrics
    assert resumed["explanations_reused"] == 3  # CAM, superpixels, LIME of the finished image
    assert resumed["explanations_computed"] == 6  # the two images the first run never finished


# --------------------------------------------------------------------------- outputs at scale


def _result(index: int, iou: float | None) -> ImageResult:
    result = ImageResult(name=f"img{index}", artifact_stem=f"img{index}")
    if iou is not None:
        result.values["iou"] = iou
    return result


def test_overlays_past_the_cap_are_the_extremes_and_a_fixed_sample(tmp_path):
    rng = np.random.default_rng(3)
    ious = list(rng.random(200))
    ious[17] = None  # a flagged image can only be sampled

    def draw(index: int) -> Path:
        path = tmp_path / f"{index}.png"
        path.write_bytes(b"x")
        return path

    plan = OverlayPlan(cap=12, total=200, seed=0)
    for index, iou in enumerate(ious):
        plan.offer(index, iou, lambda index=index: draw(index))
    kept = {int(p.stem) for p in tmp_path.iterdir()}
    ranked = sorted((i for i, v in enumerate(ious) if v is not None), key=lambda i: ious[i])
    assert set(ranked[-4:]) <= kept
    assert set(ranked[:4]) <= kept
    assert plan.sampled <= kept
    assert len(plan.sampled) == 4
    assert kept == set(ranked[-4:]) | set(ranked[:4]) | plan.sampled
    assert OverlayPlan(cap=12, total=200, seed=0).sampled == plan.sampled  # fixed sample

    small = OverlayPlan(cap=12, total=12)
    assert small.every  # up to the cap: every image
    assert OverlayPlan(cap=0, total=5).none


def test_iou_chart_of_many_images_keeps_a_bounded_size():
    results = [_result(n, n / 500) for n in range(500)] + [_result(500, None)]
    figure = plots.iou_bar_chart(results, "many")
    assert tuple(figure.get_size_inches()) == (10, 4)
    assert "500 with" not in figure.axes[0].get_xlabel()
    assert "501 images by IoU rank (1 without IoU" in figure.axes[0].get_xlabel()


def test_per_image_series_are_logged_in_batches(tracking_store):
    client = tracking_store.client
    run = RunLogger.start(client, tracking_store.experiment_id, "batched", {})
    calls = []
    real = client.log_batch
    client.log_batch = lambda *a, **k: calls.append(1) or real(*a, **k)
    run.log_series(
        [(step, {"per_image/iou": step / 300, "per_image/x": 1.0}) for step in range(300)]
    )
    assert len(calls) == 1  # 600 values in one call, not one per image
    history = client.get_metric_history(run.run_id, "per_image/iou")
    assert sorted((m.step, m.value) for m in history) == [(s, s / 300) for s in range(300)]


def test_open_images_of_bundled_and_folder_sources(tmp_path):
    assert len(open_images(DataConfig())) == 6
    _png(tmp_path / "a.png")
    folder = open_images(DataConfig(source="folder", dir=str(tmp_path), recursive=False))
    assert [f.name for f in folder.files] == ["a.png"]
