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
