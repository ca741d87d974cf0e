"""Tests for xai_exp.data.images: bundled images, folder loading, image modes and artifact stems."""

from __future__ import annotations

import dataclasses
import hashlib
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import skimage
from PIL import Image, JpegImagePlugin

from xai_exp.data import images as data
from xai_exp.data.images import (
    MAX_SIDE,
    DataError,
    ImageItem,
    ImageLoadError,
    SkippedFile,
    bundled_images,
    folder_images,
    load_image,
    safe_artifact_stem,
)

BUNDLED_NAMES = ["astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "grace_hopper"]


def _rgb(width: int = 8, height: int = 6, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def _assert_rgb_u8(array: np.ndarray, height: int | None = None, width: int | None = None):
    assert isinstance(array, np.ndarray)
    assert array.dtype == np.uint8
    assert array.ndim == 3
    assert array.shape[2] == 3
    if height is not None:
        assert array.shape[:2] == (height, width)


# --------------------------------------------------------------------------- bundled


@pytest.fixture(scope="module")
def bundled() -> list[ImageItem]:
    return bundled_images()


def test_bundled_six_images_in_order(bundled):
    assert [item.name for item in bundled] == BUNDLED_NAMES
    for item in bundled:
        _assert_rgb_u8(item.image)
        assert min(item.image.shape[:2]) > 100
        assert Path(item.source).is_file()
        assert item.artifact_stem == item.name
    assert len({item.content_hash for item in bundled}) == 6


def test_bundled_hashes_stable_and_match_file_bytes(bundled):
    again = bundled_images()
    assert [i.content_hash for i in again] == [i.content_hash for i in bundled]
    for item in bundled:
        assert item.content_hash == hashlib.sha256(Path(item.source).read_bytes()).hexdigest()
    assert all(np.array_equal(a.image, b.image) for a, b in zip(again, bundled, strict=True))


def test_bundled_limit():
    assert [i.name for i in bundled_images(limit=2)] == BUNDLED_NAMES[:2]
    assert len(bundled_images(limit=50)) == 6
    with pytest.raises(ValueError, match="limit"):
        bundled_images(limit=0)


def test_bundled_chelsea_comes_from_installed_skimage(bundled):
    chelsea = next(i for i in bundled if i.name == "chelsea")
    source = Path(chelsea.source).resolve()
    assert source.is_file()
    assert source.is_relative_to(Path(skimage.__file__).resolve().parent)
    assert {"site-packages", "dist-packages"} & set(source.parts)
    assert chelsea.image.shape == (300, 451, 3)


def test_image_item_is_frozen(bundled):
    with pytest.raises(dataclasses.FrozenInstanceError):
        bundled[0].name = "other"  # type: ignore[misc]


# --------------------------------------------------------------------------- skipped files


def test_broken_files_are_skipped_and_valid_ones_load(tmp_path):
    good = _save(_rgb(10, 7), tmp_path / "good.png")
    full = _save(_rgb(64, 48, seed=1), tmp_path / "whole.jpg", quality=90)
    raw = full.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "notes.jpg").write_text("this is not an image\n")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / ".hidden.png").write_bytes(b"garbage")
    (tmp_path / "readme.txt").write_text("hello")
    (tmp_path / "subdir.png").mkdir()

    items, skipped = folder_images(tmp_path)

    assert [i.name for i in items] == ["good.png", "whole.jpg"]
    assert items[0].image.shape == (7, 10, 3)
    assert np.array_equal(items[0].image, np.asarray(Image.open(good)))
    assert items[0].content_hash == hashlib.sha256(good.read_bytes()).hexdigest()
    assert items[0].source == str(good)

    reasons = {Path(s.path).name: s.reason for s in skipped}
    # decoding failures, a non-image and an empty class folder; hidden files stay unlisted
    assert set(reasons) == {"truncated.jpg", "notes.jpg", "empty.png", "readme.txt", "subdir.png"}
    assert reasons["readme.txt"].startswith("not an image (.txt file")
    assert reasons["subdir.png"] == "class folder without images"
    assert all(isinstance(s, SkippedFile) for s in skipped)
    assert "truncated" in reasons["truncated.jpg"]
    assert "JPEG" in reasons["truncated.jpg"]
    assert "not a recognised image" in reasons["notes.jpg"]
    assert reasons["empty.png"] == "empty file"
    assert all("\n" not in r and r for r in reasons.values())


def test_limit_keeps_the_first_files_by_name(tmp_path):
    # data.limit defines the study (the same files in every shard job), so a file that
    # fails to decode still counts
    (tmp_path / "a_broken.jpg").write_bytes(b"nope")
    _save(_rgb(), tmp_path / "b.png")
    _save(_rgb(), tmp_path / "c.png")
    (tmp_path / "d_broken.png").write_bytes(b"nope")

    items, skipped = folder_images(tmp_path, limit=2)
    assert [i.name for i in items] == ["b.png"]
    assert [Path(s.path).name for s in skipped] == ["a_broken.jpg"]

    items, skipped = folder_images(tmp_path)
    assert [i.name for i in items] == ["b.png", "c.png"]
    assert len(skipped) == 2


def test_load_image_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(ImageLoadError) as info:
        load_image(bad)
    message = str(info.value)
    assert str(bad) in message
    assert "\n" not in message
    assert "Traceback" not in message

    with pytest.raises(ImageLoadError, match="file not found"):
        load_image(tmp_path / "missing.png")


def test_decompression_bomb_becomes_image_load_error(tmp_path, monkeypatch):
    big = _save(_rgb(100, 100), tmp_path / "big.png")
    medium = _save(_rgb(40, 40), tmp_path / "medium.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for path in (big, medium):  # above 2x the limit: Pillow's error; above it: the budget
        with pytest.raises(ImageLoadError, match=r"above the pixel budget data\.max_pixels=1,000"):
            load_image(path)


# --------------------------------------------------------------------------- modes


def test_grayscale_l(tmp_path):
    gray = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (4, 1))
    path = _save(Image.fromarray(gray, mode="L"), tmp_path / "gray.png")
    out = load_image(path)
    _assert_rgb_u8(out, 4, 25)
    assert np.array_equal(out[..., 0], gray)
    assert np.array_equal(out[..., 0], out[..., 2])


def test_rgba_transparent_pixel_becomes_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red everywhere
    rgba[..., 3] = 255
    rgba[0, 0] = (0, 0, 0, 0)  # fully transparent black
    rgba[1, 1] = (0, 0, 0, 128)  # half-transparent black
    out = load_image(_save(Image.fromarray(rgba, mode="RGBA"), tmp_path / "a.png"))
    _assert_rgb_u8(out, 4, 4)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[2, 2]) == (200, 0, 0)
    assert 120 <= int(out[1, 1, 0]) <= 135


def test_la_mode(tmp_path):
    la = Image.new("LA", (5, 3), (40, 255))
    la.putpixel((0, 0), (0, 0))
    out = load_image(_save(la, tmp_path / "la.png"))
    _assert_rgb_u8(out, 3, 5)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[2, 4]) == (40, 40, 40)


def test_palette_with_transparency(tmp_path):
    pal = Image.new("P", (6, 4), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    pal.putpixel((0, 0), 0)
    out = load_image(_save(pal, tmp_path / "p.png", transparency=0))
    _assert_rgb_u8(out, 4, 6)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[1, 1]) == (0, 0, 255)


def test_16bit_grayscale_ramp_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 256).astype(np.uint16).reshape(1, 256).repeat(3, axis=0)
    img = Image.fromarray(ramp)
    assert img.mode.startswith("I")
    path = _save(img, tmp_path / "ramp16.png")
    out = load_image(path)
    _assert_rgb_u8(out, 3, 256)
    assert out.min() <= 2
    assert out.max() >= 250
    assert len(np.unique(out[0, :, 0])) > 200  # a ramp, not a step at 255
    assert np.all(np.diff(out[0, :, 0].astype(int)) >= 0)


def test_16bit_half_range_keeps_relative_brightness(tmp_path):
    half = np.full((2, 2), 32767, dtype=np.uint16)
    out = load_image(_save(Image.fromarray(half), tmp_path / "half16.png"))
    _assert_rgb_u8(out, 2, 2)
    assert 125 <= int(out[0, 0, 0]) <= 130  # scaled by the 16-bit range: not clipped, not stretched


def test_32bit_integer_tiff(tmp_path):
    values = np.linspace(0, 65535, 64).astype(np.int32).reshape(8, 8)
    path = _save(Image.fromarray(values, mode="I"), tmp_path / "int32.tif")
    out = load_image(path)
    _assert_rgb_u8(out, 8, 8)
    assert out.max() >= 250
    assert out.min() <= 2


def test_float_tiff(tmp_path):
    values = np.linspace(0.0, 1.0, 48, dtype=np.float32).reshape(6, 8)
    path = _save(Image.fromarray(values, mode="F"), tmp_path / "float.tif")
    out = load_image(path)
    _assert_rgb_u8(out, 6, 8)
    assert out[0, 0, 0] == 0
    assert out[-1, -1, 0] == 255


def test_cmyk_jpeg(tmp_path):
    path = _save(Image.new("CMYK", (16, 8), (0, 255, 255, 0)), tmp_path / "cmyk.jpg")
    assert Image.open(path).mode == "CMYK"
    out = load_image(path)
    _assert_rgb_u8(out, 8, 16)
    r, g, b = (int(v) for v in out[4, 8])
    assert r > 200  # cyan/magenta/yellow = 0/255/255 is red
    assert g < 60
    assert b < 60


def test_mode_1(tmp_path):
    bits = Image.new("1", (9, 5), 0)
    bits.putpixel((0, 0), 1)
    out = load_image(_save(bits, tmp_path / "bits.bmp"))
    _assert_rgb_u8(out, 5, 9)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[4, 8]) == (0, 0, 0)


def test_webp(tmp_path):
    out = load_image(_save(_rgb(12, 10), tmp_path / "x.webp", lossless=True))
    _assert_rgb_u8(out, 10, 12)


# --------------------------------------------------------------------------- EXIF and sizes


def test_exif_orientation_6_rotates(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 8, 8))  # red block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(img, tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    out = load_image(path)
    _assert_rgb_u8(out, 40, 20)
    # orientation 6 = rotate 90 degrees clockwise for display: top-left goes top-right
    assert out[2, -3, 0] > 200
    assert out[2, -3, 2] < 60
    assert out[2, 2, 2] > 200
    assert out[2, 2, 0] < 60


@pytest.mark.parametrize("size", [(1, 1), (3, 3)])
def test_tiny_images_load(tmp_path, size):
    out = load_image(_save(_rgb(*size), tmp_path / "tiny.png"))
    _assert_rgb_u8(out, size[1], size[0])


def test_huge_jpeg_is_downscaled_on_load(tmp_path):
    img = Image.new("RGB", (6000, 4000), (30, 120, 200))
    img.paste((250, 250, 10), (1000, 1000, 3000, 2500))
    path = _save(img, tmp_path / "huge.jpg", quality=80)
    del img
    tracemalloc.start()
    try:
        out = load_image(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    _assert_rgb_u8(out)
    assert max(out.shape[:2]) <= MAX_SIDE
    assert max(out.shape[:2]) >= MAX_SIDE - 1
    assert abs(out.shape[1] / out.shape[0] - 1.5) < 0.01
    # No full-size array is ever made on the Python side (a full uint8 copy is 72 MB).
    assert peak < 6000 * 4000 * 3 // 2
    centre = [int(v) for v in out[out.shape[0] // 2, out.shape[1] // 3]]
    assert centre == pytest.approx([250, 250, 10], abs=8)


def test_huge_jpeg_uses_reduced_decoding(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (6000, 4000), (10, 20, 30)), tmp_path / "huge.jpg")
    decoded_sizes = []
    original_load = JpegImagePlugin.JpegImageFile.load

    def spy_load(self):
        result = original_load(self)
        decoded_sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", spy_load)
    out = load_image(path)
    assert max(out.shape[:2]) <= MAX_SIDE
    assert decoded_sizes
    assert max(decoded_sizes[0]) < 6000  # libjpeg decoded at a reduced scale (draft)


def test_max_side_argument(tmp_path):
    out = load_image(_save(_rgb(300, 100), tmp_path / "wide.png"), max_side=60)
    assert out.shape == (20, 60, 3)
    with pytest.raises(ValueError, match="max_side"):
        load_image(tmp_path / "wide.png", max_side=0)


# --------------------------------------------------------------------------- names


NASTY_NAMES = [
    "../evil.png",
    "..\\..\\evil",
    "/etc/passwd",
    "C:\\Windows\\x.png",
    "...",
    "",
    ".hidden",
    "it's.png",
    "my cat.png",
    'a:b*c?d<e>f|g"h',
    "CON",
    "nul.txt",
    "x" * 300,
    "café.png",
    "tab\there\nnewline",
]


@pytest.mark.parametrize("name", NASTY_NAMES)
def test_safe_artifact_stem_is_filesystem_safe(tmp_path, name):
    stem = safe_artifact_stem(name)
    assert stem
    assert not stem.startswith(".")
    assert ".." not in stem
    assert "/" not in stem
    assert "\\" not in stem
    assert len(stem) <= 100
    assert all(ch.isalnum() or ch in "-_." for ch in stem)
    assert stem.split(".")[0].upper() not in {"CON", "NUL"}
    target = (tmp_path / stem).resolve()
    assert target.parent == tmp_path.resolve()


def test_safe_artifact_stem_examples():
    assert safe_artifact_stem("my cat") == "my_cat"
    assert safe_artifact_stem("it's") == "it_s"
    assert safe_artifact_stem("café") == "café"
    assert safe_artifact_stem("chelsea") == "chelsea"
    long_a = safe_artifact_stem("a" * 150 + "1")
    long_b = safe_artifact_stem("a" * 150 + "2")
    assert long_a != long_b
    assert len(long_a) <= 100


def test_folder_stems_are_unique_and_safe(tmp_path):
    names = [
        "my cat.png",
        "it's.png",
        "café.png",
        "cat.png",
        "cat.jpg",
        "a b.png",
        "a_b.png",
        "Dog.png",
        "dog.jpg",
        "x" * 200 + "1.png",
        "x" * 200 + "2.png",
    ]
    for i, name in enumerate(names):
        _save(_rgb(seed=i), tmp_path / name)

    items, skipped = folder_images(tmp_path)
    assert skipped == []
    assert sorted(i.name for i in items) == sorted(names)
    by_name = {i.name: i.artifact_stem for i in items}
    stems = list(by_name.values())
    assert len({s.casefold() for s in stems}) == len(stems)  # unique even case-insensitively
    out_dir = tmp_path / "artifacts"
    for stem in stems:
        assert stem
        assert not stem.startswith(".")
        assert ".." not in stem
        assert "/" not in stem
        assert "\\" not in stem
        assert len(stem) <= 100
        assert (out_dir / stem).resolve().parent == out_dir.resolve()
    assert by_name["my cat.png"] == "my_cat"
    assert by_name["café.png"] == "café"
    assert by_name["cat.png"] == "cat_png"
    assert by_name["cat.jpg"] == "cat_jpg"
    assert {by_name["a b.png"], by_name["a_b.png"]} == {"a_b_png", "a_b_png-2"}


# --------------------------------------------------------------------------- errors


def test_missing_folder_raises_data_error(tmp_path):
    missing = tmp_path / "no such folder"
    with pytest.raises(DataError) as info:
        folder_images(missing)
    message = str(info.value)
    assert str(missing) in message
    assert "data.dir" in message
    assert "\n" not in message


def test_file_instead_of_folder_raises_data_error(tmp_path):
    path = _save(_rgb(), tmp_path / "one.png")
    with pytest.raises(DataError, match="not a directory"):
        folder_images(path)


def test_folder_with_only_broken_files(tmp_path):
    (tmp_path / "a.jpg").write_text("text")
    (tmp_path / "b.png").write_bytes(b"")
    with pytest.raises(DataError) as info:
        folder_images(tmp_path)
    message = str(info.value)
    assert "2 file(s) skipped" in message
    assert "a.jpg" in message
    assert "empty file" in message
    assert "\n" not in message
    assert isinstance(info.value, ValueError)


def test_folder_without_images(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no images found"):
        folder_images(tmp_path)


# --------------------------------------------------------------------------- extensions


def test_extension_case_and_sorted_order(tmp_path):
    _save(_rgb(), tmp_path / "UPPER.JPG", format="JPEG")
    _save(_rgb(), tmp_path / "x.TIFF", format="TIFF")
    _save(_rgb(), tmp_path / "b.png")
    _save(_rgb(), tmp_path / "a.Jpeg", format="JPEG")
    _save(_rgb(), tmp_path / "c.gif", format="GIF")  # unsupported extension: listed as skipped

    items, skipped = folder_images(tmp_path)
    assert [i.name for i in items] == ["a.Jpeg", "b.png", "UPPER.JPG", "x.TIFF"]
    assert [(Path(s.path).name, s.reason.split(";")[0]) for s in skipped] == [
        ("c.gif", "not an image (.gif file")
    ]
    assert [i.artifact_stem for i in items] == ["a", "b", "UPPER", "x"]


def test_module_has_no_heavy_imports():
    source = Path(data.__file__).read_text()
    for banned in ("mlflow", "hydra", "torch"):
        assert f"import {banned}" not in source


def test_paths_typed_with_a_tilde_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "photos").mkdir()
    assert data.check_folder("~/photos") == tmp_path / "photos"
    with pytest.raises(data.DataError, match=str(tmp_path / "missing")):
        data.check_folder("~/missing")  # the message names the expanded path
    from xai_exp.app.hydra_app import compose_config

    cfg = compose_config(["data=folder", 'data.dir="~/photos"'])
    assert cfg.data.dir == "~/photos"  # quoted for Hydra, expanded where it is used
    assert data.check_folder(cfg.data.dir).is_dir()
