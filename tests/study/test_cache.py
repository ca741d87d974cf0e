"""The explanation cache: round trip, damaged entries discarded, atomic writes."""

import numpy as np
import pytest

from xai_exp.cache import ExplanationCache, cache_key


@pytest.fixture
def cache(tmp_path):
    return ExplanationCache(tmp_path / "cache")


def test_round_trip_keeps_arrays_and_meta(cache):
    arrays = {"cam": np.random.default_rng(0).random((5, 4)).astype(np.float32)}
    cache.store("cam", "k1", arrays, {"seconds": 1.5})
    entry = cache.load("cam", "k1")
    np.testing.assert_array_equal(entry.arrays["cam"], arrays["cam"])
    assert entry.meta == {"seconds": 1.5}
    assert (cache.hits, cache.misses) == (1, 0)


def test_key_depends_on_every_part_and_not_on_order():
    assert cache_key(a=1, b=[1, 2]) == cache_key(b=[1, 2], a=1)
    assert cache_key(a=1, b=[1, 2]) != cache_key(a=1, b=[2, 1])
    assert cache_key(a=1) != cache_key(a=1.5)


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "garbage"])
def test_damaged_entry_is_discarded_not_used(cache, damage):
    cache.store("cam", "k2", {"cam": np.arange(1000, dtype=np.float32)}, {"seconds": 1})
    path = next(cache.directory.rglob("k2.npz"))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip_byte":
        # inside the stored array's bytes: the zip stays valid, the checksum does not
        offset = data.find(np.arange(1000, dtype=np.float32).tobytes()[400:420])
        assert offset > 0
        data[offset] ^= 0xFF
    else:
        data = b"not a zip at all"
    path.write_bytes(bytes(data))
    assert cache.load("cam", "k2") is None
    assert not path.exists()
    assert cache.discarded == 1


def test_disabled_cache_stores_and_returns_nothing(tmp_path):
    off = ExplanationCache(tmp_path / "c", enabled=False)
    off.store("cam", "k", {"x": np.zeros(2)}, {})
    assert off.load("cam", "k") is None
    assert not (tmp_path / "c").exists()


def test_no_temp_files_left_behind(cache):
    for index in range(3):
        cache.store("lime", f"k{index}", {"w": np.ones(3)}, {"seconds": 0})
    names = [p.name for p in cache.directory.rglob("*") if p.is_file()]
    assert sorted(names) == ["k0.npz", "k1.npz", "k2.npz"]


# --------------------------------------------------------------------------- forged entries
# Entries with a valid checksum (written by the cache's own `store`) whose arrays or seconds are
# not what the step computes: each is discarded with one warning and recomputed, and the run's
# results are a clean run's.


def _forgeries() -> dict[str, tuple[str, object]]:
    def replace(name: str, make):  # the array `name` replaced by make(array)
        return lambda arrays, meta: ({**arrays, name: make(arrays[name])}, meta)

    def seconds(value):
        return lambda arrays, meta: (arrays, {**meta, "seconds": value})

    return {
        "cam of integers": ("cam", replace("cam", lambda a: (a * 10).astype(np.int64))),
        "cam with NaN": ("cam", replace("cam", lambda a: np.where(a > a.mean(), np.nan, a))),
        "cam of text": ("cam", replace("cam", lambda a: a.astype(str))),
        "segments of floats": ("segments", replace("segments", lambda a: a.astype(np.float32))),
        "segment ids from 1": ("segments", replace("segments", lambda a: a + 1)),
        "segment ids with gaps": ("segments", replace("segments", lambda a: a * 2)),
        "negative segment ids": ("segments", replace("segments", lambda a: a - 1)),
        "weights of integers": ("lime", replace("weights", lambda a: np.sign(a).astype(np.int8))),
        "infinite weights": ("lime", replace("weights", lambda a: np.full_like(a, np.inf))),
        "probabilities not summing to 1": (
            "prediction",
            replace("probabilities", lambda a: a * 3),
        ),
        "negative probabilities": ("prediction", replace("probabilities", lambda a: a - a.mean())),
        "probabilities of integers": (
            "prediction",
            replace("probabilities", lambda a: np.eye(len(a), dtype=np.int64)[0]),
        ),
        "curve above 1": ("faithfulness", replace("deletion", lambda a: a + 2)),
        "curve with NaN": ("faithfulness", replace("insertion", lambda a: a * np.nan)),
        "rho above 1": ("sanity", replace("rho", lambda a: a + 5)),
        "layers of numbers": ("sanity", replace("layers", lambda a: np.arange(len(a)))),
        "a rho too few": ("sanity", replace("rho", lambda a: a[:-1])),
        "seconds as text": ("cam", seconds("1.5 s")),
        "negative seconds": ("lime", seconds(-1.0)),
    }


FORGERIES = _forgeries()


def _study_config():
    from tiny_models import smooth_study_config as config

    cfg = config(0.1)
    cfg.inference.engine = "torch"
    cfg.metrics.faithfulness = cfg.metrics.sanity = True
    cfg.metrics.steps, cfg.metrics.sanity_layers = 5, 2
    return cfg


def _outcome(results) -> list[str]:
    """What a run found, less the seconds (a recomputed step measures its own)."""
    return [
        repr(
            (
                r.status,
                r.reason,
                r.predicted_class,
                r.probability,
                r.target_class,
                sorted((k, v) for k, v in r.values.items() if not k.endswith("seconds")),
            )
        )
        for r in results
    ]


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """A clean run's cache folder and outcome (metrics beyond IoU on: every kind of entry)."""
    from tiny_models import SMOOTH_ITEMS as IMAGES
    from tiny_models import tiny_classifier

    from xai_exp.study.pipeline import Study, run_study

    folder = tmp_path_factory.mktemp("clean") / "cache"
    results = run_study(
        Study(_study_config(), tiny_classifier(), ExplanationCache(folder)),
        IMAGES[1:],
        progress=False,
    )
    return folder, _outcome(results)


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_a_forged_entry_with_a_valid_checksum_is_discarded_and_recomputed(
    forgery, clean_run, tmp_path, caplog
):
    import shutil

    from tiny_models import SMOOTH_ITEMS as IMAGES
    from tiny_models import tiny_classifier

    from xai_exp.study.pipeline import Study, run_study

    folder, clean = clean_run
    shutil.copytree(folder, tmp_path / "cache")
    cache = ExplanationCache(tmp_path / "cache")
    kind, forge = FORGERIES[forgery]
    paths = sorted((tmp_path / "cache" / kind).rglob("*.npz"))
    assert paths
    for path in paths:
        entry = cache.load(kind, path.stem)
        arrays, meta = forge(entry.arrays, entry.meta)
        cache.store(kind, path.stem, arrays, meta)
        assert cache.load(kind, path.stem) is not None  # the checksum is valid

    classifier = tiny_classifier()
    cache = ExplanationCache(tmp_path / "cache")
    with caplog.at_level("WARNING"):
        results = run_study(Study(_study_config(), classifier, cache), IMAGES[1:], progress=False)
    assert _outcome(results) == clean
    assert cache.discarded == len(paths)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == len(paths)
    assert all("discarding cache entry" in w and "\n" not in w for w in warnings)

    again = ExplanationCache(tmp_path / "cache")
    results = run_study(Study(_study_config(), classifier, again), IMAGES[1:], progress=False)
    assert _outcome(results) == clean
    assert again.discarded == 0  # the recomputed entries replaced the forged ones
    assert again.misses == 0
