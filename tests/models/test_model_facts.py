"""A fully cached rerun from the model's cached facts: no network is built, torch is not even
imported, the results are the same; anything not cached builds the network once; stale or
unknowable facts fall back to building it first."""

from __future__ import annotations

import dataclasses
import os
import subprocess

import pytest
import torch
from conftest import TINY_STUDY, study_command
from tiny_models import SMOOTH_ITEMS as IMAGES
from tiny_models import smooth_study_config as config
from tiny_models import tiny_classifier

from xai_exp.app.job import check_config
from xai_exp.cache import ExplanationCache
from xai_exp.config import ConfigError, StudyConfig
from xai_exp.models.facts import (
    FACTS_KIND,
    DeferredClassifier,
    ModelFacts,
    StaleModelFactsError,
    cached_facts,
    facts_key,
    facts_of,
    store_facts,
)
from xai_exp.study.pipeline import Study, run_study

LIMIT = "data.limit=2"


def comparable(results: list) -> list[tuple]:
    return [
        (r.name, r.predicted_class, r.probability, r.target_class, r.values.get("iou"))
        for r in results
    ]


class CountingBuild:
    """A build function that hands out a prepared classifier and counts its calls."""

    def __init__(self, classifier, engine: str = "torch") -> None:
        self.classifier, self.engine, self.calls = classifier, engine, 0

    def __call__(self):
        self.calls += 1
        return self.classifier, self.engine


def test_a_cached_study_never_builds_the_network_and_a_missing_map_builds_it_once(tmp_path):
    classifier = tiny_classifier()
    cache = ExplanationCache(tmp_path)
    cfg = config(0.1)
    cfg.inference.engine = "torch"
    eager = Study(cfg, classifier, cache)
    first = run_study(eager, IMAGES, progress=False)

    build = CountingBuild(classifier)
    cfg.threshold.cam_top_fraction = 0.3  # another threshold: nothing new to compute
    again = run_study(Study(cfg, DeferredClassifier(eager.facts, build), cache), IMAGES)
    assert build.calls == 0
    assert [r[:4] for r in comparable(again)] == [r[:4] for r in comparable(first)]

    cfg.threshold.cam_top_fraction = 0.1
    same = run_study(Study(cfg, DeferredClassifier(eager.facts, build), cache), IMAGES)
    assert comparable(same) == comparable(first)
    assert build.calls == 0

    cfg.lime.num_samples = 50  # LIME is not cached for this count: the network is needed
    deferred = DeferredClassifier(eager.facts, build)
    run_study(Study(cfg, deferred, cache), IMAGES, progress=False)
    assert build.calls == 1
    assert deferred.built


def test_facts_of_another_network_are_refused_and_forgotten(tmp_path):
    cache = ExplanationCache(tmp_path)
    cfg = config()
    cfg.inference.engine = "torch"
    facts = Study(cfg, tiny_classifier(seed=0), cache).facts
    store_facts(cache, "k" * 64, facts)
    deferred = DeferredClassifier(
        facts,
        CountingBuild(tiny_classifier(seed=1)),  # other weights behind the same facts
        forget=lambda: cache.discard(FACTS_KIND, "k" * 64, "stale"),
    )
    with pytest.raises(StaleModelFactsError, match="identity"):
        deferred.get()
    assert isinstance(StaleModelFactsError("x"), ConfigError)  # one line, the run stops
    assert cached_facts(cache, "k" * 64) is None


def test_a_model_that_cannot_be_built_stops_the_run_once_not_per_image(tmp_path):
    cfg = config()
    cfg.inference.engine = "torch"
    facts = Study(cfg, tiny_classifier(), ExplanationCache(tmp_path / "warm")).facts
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("checkpoint unreadable")

    study = Study(cfg, DeferredClassifier(facts, broken), ExplanationCache(tmp_path / "cold"))
    with pytest.raises(ConfigError, match="loaded: RuntimeError: checkpoint unreadable"):
        run_study(study, IMAGES, progress=False)
    assert len(calls) == 1


def test_facts_survive_the_cache_and_carry_the_family_refusals(tmp_path):
    classifier = tiny_classifier()
    facts = facts_of(classifier, "onnxruntime")
    cache = ExplanationCache(tmp_path)
    store_facts(cache, "f" * 64, facts)
    assert cached_facts(cache, "f" * 64) == facts
    vit = dataclasses.replace(facts, refusals={"ablationcam": "method=ablationcam does not"})
    with pytest.raises(ConfigError, match="method=ablationcam does not"):
        vit.check_method("ablationcam")
    vit.check_method("gradcam")
    assert facts.cam_implementation("scorecam", "fast") == "fast"
    assert facts.cam_implementation("scorecam", "reference") == "grad-cam"


def test_facts_key_follows_the_weights_file_and_refuses_what_only_a_build_can_tell(
    tmp_path, monkeypatch
):
    checkpoint = tmp_path / "weights.pt"
    torch.save(tiny_classifier().model.state_dict(), checkpoint)
    cfg = StudyConfig(device="cpu")
    cfg.model.arch, cfg.model.checkpoint = "resnet18", str(checkpoint)
    key = facts_key(cfg)
    assert key is not None
    assert facts_key(cfg) == key

    torch.save(tiny_classifier(seed=1).model.state_dict(), checkpoint)
    os.utime(checkpoint, ns=(1, 1))  # other weights, another stamp
    assert facts_key(cfg) not in (None, key)
    assert facts_key(dataclasses.replace(cfg, precision="bf16")) not in (None, key)

    downloaded = StudyConfig(device="cpu")
    downloaded.model.arch, downloaded.model.weights = "resnet18", "pretrained"
    assert facts_key(downloaded) is None  # only the download says which weights
    assert facts_key(dataclasses.replace(cfg, device="cuda")) is None
    monkeypatch.setattr("xai_exp.models.facts.gpu_driver_present", lambda: True)
    assert facts_key(dataclasses.replace(cfg, device="auto")) is None  # torch must decide
    assert facts_key(cfg) is not None  # device=cpu needs no torch to decide


def test_check_config_refuses_a_method_from_cached_facts(tmp_path):
    cache = ExplanationCache(tmp_path)
    cfg = StudyConfig(device="cpu")
    cfg.model.arch, cfg.model.weights, cfg.model.input_size = "resnet18", None, 64
    key = facts_key(cfg)
    facts = ModelFacts(
        arch="vit", identity="vit:0", input_size=64, labels=["a"], mean=(0.5,) * 3,
        std=(0.5,) * 3, crop_fraction=1.0, interpolation="bicubic",
        target_layer_name="blocks.-1.norm1", family="vit", device="cpu", engine="torch",
        refusals={"ablationcam": "method=ablationcam does not work on vit models (tokens)"},
    )  # fmt: skip
    store_facts(cache, key, facts)
    assert isinstance(check_config(cfg, cache, key), DeferredClassifier)
    cfg.method.name = "ablationcam"
    with pytest.raises(ConfigError, match="does not work on vit models"):
        check_config(cfg, cache, key)


@pytest.mark.slow
def test_a_fully_cached_rerun_imports_no_torch_and_logs_the_same_results(tmp_path):
    def run(name: str, *flags: str) -> subprocess.CompletedProcess:
        args = study_command(tmp_path, *TINY_STUDY, LIMIT, f"hydra.run.dir={tmp_path / name}")
        done = subprocess.run(
            [args[0], *flags, *args[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        return done

    run("first")
    again = run("again", "-X", "importtime")
    imported = {line.split("|")[-1].strip() for line in again.stderr.splitlines()}
    assert "mlflow" in imported
    assert "torch" not in imported
    assert "timm" not in imported
    log = (tmp_path / "again" / "xai-exp.log").read_text()
    assert "the model was not loaded" in log

    def rows(name: str) -> list[list[str]]:
        lines = (tmp_path / name / "results.csv").read_text().splitlines()
        header = lines[0].split(",")
        keep = [i for i, col in enumerate(header) if "reused" not in col]
        return [[line.split(",")[i] for i in keep] for line in lines]

    assert rows("again") == rows("first")


def test_a_checkpoint_replaced_keeping_its_size_and_mtime_is_a_new_model(tmp_path):
    import numpy as np
    import torchvision

    checkpoint = tmp_path / "weights.pt"

    def save(seed: int) -> None:
        torch.manual_seed(seed)
        torch.save(torchvision.models.squeezenet1_1().state_dict(), checkpoint)

    save(0)
    cfg = config()
    cfg.device, cfg.inference.engine = "cpu", "torch"
    cfg.model.arch, cfg.model.weights, cfg.model.checkpoint = "squeezenet1_1", None, str(checkpoint)
    cfg.model.target_layer, cfg.model.input_size = "features.12", 64
    cache = ExplanationCache(tmp_path / "cache")

    def run() -> tuple[Study, np.ndarray]:
        key = facts_key(cfg)
        model = check_config(cfg, cache, key)
        study = Study(cfg, model, cache)
        if not isinstance(model, DeferredClassifier):
            store_facts(cache, key, study.facts)
        return study, study.prediction(IMAGES[0], study.facts.view(IMAGES[0].image))

    first, before = run()
    cached, same = run()
    assert isinstance(cached.model, DeferredClassifier)
    assert not cached.model.built  # all cached: no network
    assert np.array_equal(same, before)

    stat = checkpoint.stat()
    save(1)  # as `cp -p` or `rsync -t` would leave it: other weights, same size and mtime
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (checkpoint.stat().st_size, checkpoint.stat().st_mtime_ns) == (
        stat.st_size,
        stat.st_mtime_ns,
    )
    second, after = run()
    assert second.facts.identity != first.facts.identity
    assert not np.allclose(after, before)  # predicted by the new weights, not served


FORGED_FACTS = {
    "labels as one string": {"labels": "tench goldfish"},
    "labels of numbers": {"labels": [0, 1, 2]},
    "no labels": {"labels": []},
    "identity not text": {"identity": 12},
    "input size as text": {"input_size": "64"},
    "mean of 2 numbers": {"mean": [0.5, 0.5]},
    "std of zero": {"std": [0.0, 0.5, 0.5]},
    "crop fraction above 1": {"crop_fraction": 1.5},
    "an unknown engine": {"engine": "cuda"},
    "refusals as a list": {"refusals": ["ablationcam"]},
}


@pytest.mark.parametrize("forgery", list(FORGED_FACTS))
def test_forged_facts_with_a_valid_checksum_are_discarded_and_the_network_built(
    forgery, tmp_path, caplog
):
    cache = ExplanationCache(tmp_path)
    cfg = StudyConfig(device="cpu")
    cfg.model.arch, cfg.model.weights, cfg.model.input_size = "resnet18", None, 64
    cfg.model.target_layer, cfg.inference.engine = None, "torch"
    key = facts_key(cfg)
    good = check_config(cfg, cache, key)
    facts = facts_of(good, "torch")
    cache.store(FACTS_KIND, key, {}, {**facts.to_meta(), **FORGED_FACTS[forgery]})
    with caplog.at_level("WARNING"):
        model = check_config(cfg, cache, key)
    assert not isinstance(model, DeferredClassifier)  # built, not taken from the forgery
    assert facts_of(model, "torch") == facts
    assert cache.discarded == 1
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "unusable model facts" in warning
    assert "\n" not in warning
    assert not cache.contains(FACTS_KIND, key)
