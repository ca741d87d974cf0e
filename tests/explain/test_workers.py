"""Superpixel worker processes: the same superpixels and results as inline, and no loss when
they break (the pipelined path a GPU run uses, tested on the CPU)."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
from tiny_models import smooth_image, tiny_classifier

from xai_exp.cache import ExplanationCache
from xai_exp.config import LimeConfig, StudyConfig
from xai_exp.data.images import ImageItem
from xai_exp.explain import superpixels
from xai_exp.study import pipeline, steps
from xai_exp.study.pipeline import Study, run_study
from xai_exp.study.steps import superpixel_worker_count

ITEMS = 5


def _items() -> list[ImageItem]:
    return [
        ImageItem(f"img{i}", f"img{i}", smooth_image(seed=i), f"hash-{i}", f"img{i}")
        for i in range(ITEMS)
    ]


def _config(workers: int) -> StudyConfig:
    lime = LimeConfig(num_samples=40, batch_size=16, hide_color=0)  # LIME weights that rank
    lime.segmentation.params = {"kernel_size": 2, "max_dist": 20, "ratio": 0.5}
    cfg = StudyConfig(lime=lime, progress=False)
    cfg.inference.workers = workers
    return cfg


def _run(workers: int, cache: ExplanationCache) -> tuple[Study, list]:
    study = Study(_config(workers), tiny_classifier(), cache)
    try:
        return study, run_study(study, _items(), progress=False)
    finally:
        study.close()


def test_workers_give_the_inline_superpixels_and_results(tmp_path, monkeypatch):
    _, inline = _run(0, ExplanationCache(tmp_path / "inline"))

    def not_here(*_args, **_kwargs):
        raise AssertionError("superpixels computed in the main process")

    monkeypatch.setattr(steps, "segment", not_here)
    study, pooled = _run(2, ExplanationCache(tmp_path / "pooled"))
    assert study.prefetch_depth == 4
    assert [r.status for r in pooled] == [r.status for r in inline]
    assert [r.status for r in pooled].count("ok") >= 3
    for ours, theirs in zip(pooled, inline, strict=True):
        assert np.array_equal(ours.arrays["segments"], theirs.arrays["segments"])
        assert np.array_equal(ours.arrays["lime_weights"], theirs.arrays["lime_weights"])
        assert ours.values.get("iou") == theirs.values.get("iou")
        assert ours.values["segmentation_seconds"] > 0  # the worker's own time
        assert not ours.segmentation_reused


def test_cached_superpixels_are_not_queued(tmp_path):
    cache = ExplanationCache(tmp_path / "cache")
    _run(2, cache)
    study = Study(_config(2), tiny_classifier(), cache)
    queued = []
    original = study.workers.submit
    study.workers.submit = lambda key, image: (queued.append(key), original(key, image))
    try:
        results = run_study(study, _items(), progress=False)
    finally:
        study.close()
    assert queued == []
    assert all(r.segmentation_reused for r in results)


def test_broken_workers_fall_back_inline_with_one_warning(tmp_path, caplog):
    _, inline = _run(0, ExplanationCache(tmp_path / "inline"))
    study = Study(_config(2), tiny_classifier(), ExplanationCache(tmp_path / "broken"))
    study.workers.submit("warm-up", smooth_image())  # starts the worker processes
    study.workers.take("warm-up")
    for process in list(study.workers.pool._processes.values()):
        process.kill()
        process.join()
    try:
        with caplog.at_level(logging.WARNING):
            results = run_study(study, _items(), progress=False)
    finally:
        study.close()
    assert [r.values.get("iou") for r in results] == [r.values.get("iou") for r in inline]
    warnings = [r for r in caplog.records if "superpixel workers stopped" in r.getMessage()]
    assert len(warnings) == 1


def test_an_image_that_fails_in_a_worker_fails_alone(tmp_path, monkeypatch):
    real_segment = superpixels.segment

    def fails_on_flat(image, algorithm, params):
        if image.std() == 0:
            raise ValueError("no texture to segment")
        return real_segment(image, algorithm, params)

    monkeypatch.setattr(superpixels, "segment", fails_on_flat)  # forked workers inherit it
    items = _items()
    items[2] = ImageItem("flat", "flat", np.full((32, 32, 3), 7, np.uint8), "hash-flat", "flat")
    study = Study(_config(2), tiny_classifier(), ExplanationCache(tmp_path / "c"))
    try:
        results = run_study(study, items, progress=False)
    finally:
        study.close()
    assert [r.name for r in results] == [item.name for item in items]
    assert results[2].status == "error"
    assert "error" not in [r.status for i, r in enumerate(results) if i != 2]
    assert "no texture to segment" in results[2].reason


def test_prefetch_runs_ahead_in_order():
    events: list[str] = []

    def source():
        for name in "abcde":
            events.append(f"read {name}")
            yield name

    for name in pipeline._ahead(source(), 2, lambda item: events.append(f"queue {item}")):
        events.append(f"explain {name}")
    explained = [e.split()[1] for e in events if e.startswith("explain")]
    assert explained == list("abcde")
    assert events.index("queue c") < events.index("explain a")
    assert events.index("read d") > events.index("explain a")  # two ahead, not more


def test_worker_count():
    assert superpixel_worker_count(None, "cpu") == 0
    assert 1 <= superpixel_worker_count(None, "cuda") <= 4
    assert superpixel_worker_count(3, "cpu") == 3
    assert superpixel_worker_count(0, "cuda") == 0


def test_superpixel_workers_import_no_torch():
    code = (
        "import sys\nimport xai_exp.explain.superpixels\n"
        "print('torch' in sys.modules, 'mlflow' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]
