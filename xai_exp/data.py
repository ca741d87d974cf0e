"""Image sources for experiments: bundled sample photos and folders of user images.

Everything here is plain numpy + Pillow. Every image comes back as an HxWx3 ``uint8`` RGB
array with its EXIF orientation applied and its longest side capped at ``MAX_SIDE``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SUPPORTED_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MAX_SIDE = 2048  # images larger than this on their longest side are downscaled ON LOAD

# Pillow formats we accept, whatever the file's extension says. Restricting the list keeps
# Pillow from handing odd files to plugins such as EPS (which runs Ghostscript).
_ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "DIB", "WEBP", "TIFF")  # JPEG covers MPO
# Used when Image.MAX_IMAGE_PIXELS has been disabled (set to None) by someone else.
_FALLBACK_MAX_PIXELS = 89_478_485
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_MAX_STEM_LEN = 100
_MAX_REASON_LEN = 200
_WINDOWS_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL"]
    + [f"COM{i}" for i in range(1, 10)]
    + [f"LPT{i}" for i in range(1, 10)]
)
_BUNDLED = (
    ("skimage", "data/astronaut.png", "astronaut"),
    ("skimage", "data/chelsea.png", "chelsea"),
    ("skimage", "data/coffee.png", "coffee"),
    ("skimage", "data/rocket.jpg", "rocket"),
    ("skimage", "data/motorcycle_left.png", "motorcycle_left"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "grace_hopper"),
)


class DataError(ValueError):
    """A whole data source is unusable (missing folder, no valid image)."""


class ImageLoadError(ValueError):
    """One file could not be decoded; the message names the file and the cause."""

    def __init__(self, message: str, *, path: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.path = path
        self.reason = reason if reason is not None else message


@dataclass(frozen=True, eq=False)
class ImageItem:
    """One loaded image with a unique display name and a filesystem-safe artifact stem."""

    name: str
    artifact_stem: str
    image: np.ndarray
    content_hash: str
    source: str


@dataclass(frozen=True)
class SkippedFile:
    """A file in a data folder that could not be loaded, with a one-line reason."""

    path: str
    reason: str


# --------------------------------------------------------------------------- loading


def _one_line(text: str) -> str:
    line = " ".join(str(text).split())
    if len(line) > _MAX_REASON_LEN:
        line = line[: _MAX_REASON_LEN - 3] + "..."
    return line


def _load_error(path: Path, reason: str) -> ImageLoadError:
    reason = _one_line(reason)
    return ImageLoadError(f"cannot load image {path}: {reason}", path=str(path), reason=reason)


def _check_max_side(max_side: int) -> None:
    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1:
        raise ValueError(f"max_side must be a positive integer, got {max_side!r}")


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Map a single-channel 16-bit, 32-bit integer or float array onto 0..255."""
    if mode.startswith("I;16"):
        # 16-bit data: the full range 0..65535 maps onto 0..255 (rounded, never clipped).
        scaled = values.astype(np.float32) * (255.0 / 65535.0)
    else:
        data = values.astype(np.float64)
        finite = np.isfinite(data)
        data = np.where(finite, data, 0.0)
        lo = float(data[finite].min()) if finite.any() else 0.0
        hi = float(data[finite].max()) if finite.any() else 0.0
        if mode == "F" and lo >= 0.0 and hi <= 1.0:
            scaled = data * 255.0  # float image in 0..1
        elif lo >= 0.0 and hi <= 255.0:
            scaled = data  # already 8-bit values
        elif mode == "I" and lo >= 0.0 and hi <= 65535.0:
            scaled = data * (255.0 / 65535.0)  # 16-bit data stored as 32-bit "I"
        else:
            span = hi - lo
            scaled = (data - lo) * (255.0 / span) if span > 0 else np.zeros_like(data)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited over white."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I") or mode == "F":
        gray = _scale_to_uint8(np.asarray(img), mode)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return img.convert("RGB")


def _decode(data: bytes, path: Path, max_side: int) -> np.ndarray:
    """Decode file bytes into an HxWx3 uint8 array; raises ImageLoadError on any failure."""
    if not data:
        raise _load_error(path, "empty file")
    fmt = "image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=_ALLOWED_FORMATS) as img:
                fmt = img.format or fmt
                width, height = img.size
                limit = Image.MAX_IMAGE_PIXELS or _FALLBACK_MAX_PIXELS
                if width * height > limit:
                    raise Image.DecompressionBombError(
                        f"{width}x{height} = {width * height} pixels exceeds the limit of {limit}"
                    )
                if width < 1 or height < 1:
                    raise _load_error(path, f"{fmt} has no pixels ({width}x{height})")
                if fmt in ("JPEG", "MPO") and max(width, height) > max_side:
                    # Let libjpeg decode at 1/2, 1/4 or 1/8 scale: no full-size intermediate.
                    scale = max_side / max(width, height)
                    img.draft(img.mode, (max(1, int(width * scale)), max(1, int(height * scale))))
                img.load()  # full decode now, so truncated files fail here
                oriented = _exif_transpose(img)
                rgb = _to_rgb(oriented)
                if max(rgb.size) > max_side:
                    rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
                array = np.array(rgb, dtype=np.uint8)  # a writable copy
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _load_error(path, f"image too large, possible decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise _load_error(path, "not a recognised image file (cannot identify format)") from None
    except MemoryError:
        raise _load_error(path, f"out of memory while decoding {fmt}") from None
    except Exception as exc:  # noqa: BLE001 - Pillow decoders raise OSError, SyntaxError, ...
        message = _one_line(str(exc)) or type(exc).__name__
        if "truncated" in message.lower():
            reason = f"truncated {fmt} ({message})"
        else:
            reason = f"cannot decode {fmt} ({type(exc).__name__}: {message})"
        raise _load_error(path, reason) from None
    if array.ndim != 3 or array.shape[2] != 3:
        raise _load_error(path, f"unexpected decoded shape {array.shape}")
    return array


def _exif_transpose(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; malformed EXIF data leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(img) or img
    except Exception:  # noqa: BLE001 - broken EXIF: keep the image as stored
        return img


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _load_error(path, "file not found") from None
    except IsADirectoryError:
        raise _load_error(path, "is a directory, not a file") from None
    except PermissionError:
        raise _load_error(path, "permission denied") from None
    except OSError as exc:
        raise _load_error(path, f"cannot read file ({exc.strerror or exc})") from None


def _load_with_hash(path: Path, max_side: int) -> tuple[np.ndarray, str]:
    data = _read_bytes(path)
    return _decode(data, path, max_side), hashlib.sha256(data).hexdigest()


def load_image(path: str | Path, max_side: int = MAX_SIDE) -> np.ndarray:
    """Load an image file as an HxWx3 uint8 RGB array.

    The file is fully decoded (truncated files fail here), EXIF orientation is applied,
    every Pillow mode is converted to 8-bit RGB (alpha composited over white, 16-bit and
    float data rescaled), and images whose longest side exceeds ``max_side`` are downscaled
    while loading. Any failure raises :class:`ImageLoadError` with a one-line message.
    """
    _check_max_side(max_side)
    path = Path(path)
    return _decode(_read_bytes(path), path, max_side)


# --------------------------------------------------------------------------- names


def safe_artifact_stem(name: str) -> str:
    """Turn one name into a filesystem-safe file stem (no uniqueness across names).

    Letters (any script), digits, ``-``, ``_`` and ``.`` are kept, everything else becomes
    ``_``; runs of dots collapse, leading/trailing dots are dropped, Windows device names
    are prefixed, and names over 100 characters are cut with a short hash suffix.
    """
    text = unicodedata.normalize("NFC", str(name))
    chars = [ch if (ch.isalnum() or ch in "-_.") else "_" for ch in text]
    stem = "".join(chars)
    while ".." in stem:
        stem = stem.replace("..", "_")
    stem = stem.strip(".")
    if not stem:
        stem = "image"
    if stem.split(".")[0].upper() in _WINDOWS_RESERVED:
        stem = "_" + stem
    if len(stem) > _MAX_STEM_LEN:
        digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
        stem = stem[: _MAX_STEM_LEN - 9].rstrip(".") + "-" + digest
    return stem


def _with_suffix(stem: str, suffix: str) -> str:
    return stem[: _MAX_STEM_LEN - len(suffix)].rstrip(".") + suffix


def _unique_stems(names: list[str]) -> list[str]:
    """Artifact stems for display names, unique case-insensitively within the list.

    A name's stem drops its image extension; names whose stems collide keep the
    extension (``cat_png``, ``cat_jpg``), and any remaining clash gets ``-2``, ``-3``...
    """
    bases = []
    for name in names:
        base, ext = os.path.splitext(name)
        if ext.lower() not in SUPPORTED_EXTENSIONS or not base:
            base, ext = name, ""
        bases.append((safe_artifact_stem(base), safe_artifact_stem(base + "_" + ext[1:])))
    counts: dict[str, int] = {}
    for short, _ in bases:
        counts[short.casefold()] = counts.get(short.casefold(), 0) + 1
    candidates = [short if counts[short.casefold()] == 1 else long for short, long in bases]
    taken = {c.casefold() for c in candidates}
    used: set[str] = set()
    stems = []
    for candidate in candidates:
        stem, n = candidate, 1
        # A suffixed stem must not take another item's natural stem either.
        while stem.casefold() in used or (n > 1 and stem.casefold() in taken):
            n += 1
            stem = _with_suffix(candidate, f"-{n}")
        used.add(stem.casefold())
        stems.append(stem)
    return stems


# --------------------------------------------------------------------------- sources


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / relative
        if candidate.is_file():
            return candidate
    raise DataError(f"bundled image {relative} not found in the installed {package} package")


def bundled_images(limit: int | None = None) -> list[ImageItem]:
    """The six sample photos shipped inside scikit-image and matplotlib (nothing downloaded).

    Order: astronaut, chelsea, coffee, rocket, motorcycle_left, grace_hopper; ``limit``
    keeps the first N.
    """
    _check_limit(limit)
    chosen = _BUNDLED if limit is None else _BUNDLED[:limit]
    names = [name for _, _, name in chosen]
    items = []
    for (package, relative, name), stem in zip(chosen, _unique_stems(names), strict=True):
        path = _package_file(package, relative)
        try:
            image, digest = _load_with_hash(path, MAX_SIDE)
        except ImageLoadError as exc:
            raise DataError(f"bundled image {name} is unreadable: {exc.reason}") from None
        items.append(ImageItem(name, stem, image, digest, str(path)))
    return items


def _summarise_skipped(skipped: list[SkippedFile], shown: int = 3) -> str:
    parts = [f"{Path(s.path).name}: {s.reason}" for s in skipped[:shown]]
    if len(skipped) > shown:
        parts.append(f"and {len(skipped) - shown} more")
    return _one_line("; ".join(parts))


def check_folder(directory: str | Path) -> Path:
    """The folder (``~`` expanded), or a DataError when it is missing or not a folder."""
    folder = Path(directory).expanduser()
    hint = "(set data.dir=PATH to a folder of images)"
    if not folder.exists():
        raise DataError(f"data folder not found: {folder} {hint}")
    if not folder.is_dir():
        raise DataError(f"data folder is not a directory: {folder} {hint}")
    return folder


def folder_images(
    directory: str | Path, limit: int | None = None
) -> tuple[list[ImageItem], list[SkippedFile]]:
    """Load the images directly inside ``directory``, sorted by file name.

    Files with a supported extension (any case) are tried; hidden files and other
    extensions are ignored. Files that fail to load are returned as ``SkippedFile``.
    ``limit`` caps the number of loaded images (scanning stops once it is reached).
    Raises :class:`DataError` if the folder is missing or yields no valid image.
    """
    _check_limit(limit)
    folder = check_folder(directory)
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise DataError(f"cannot list data folder {folder}: {exc.strerror or exc}") from None

    candidates = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if os.path.splitext(entry.name)[1].lower() not in SUPPORTED_EXTENSIONS:
            continue
        try:
            if not entry.is_file():
                continue
        except OSError:
            continue
        candidates.append(entry.name)
    candidates.sort(key=lambda n: (n.casefold(), n))

    loaded: list[tuple[str, np.ndarray, str, Path]] = []
    skipped: list[SkippedFile] = []
    for file_name in candidates:
        if limit is not None and len(loaded) >= limit:
            break
        path = folder / file_name
        try:
            image, digest = _load_with_hash(path, MAX_SIDE)
        except ImageLoadError as exc:
            skipped.append(SkippedFile(str(path), exc.reason))
            continue
        loaded.append((file_name, image, digest, path))

    if not loaded:
        if not skipped:
            supported = ", ".join(SUPPORTED_EXTENSIONS)
            raise DataError(f"no images found in data folder {folder} (supported: {supported})")
        raise DataError(
            f"no valid images in data folder {folder}: {len(skipped)} file(s) skipped "
            f"({_summarise_skipped(skipped)})"
        )
    stems = _unique_stems([name for name, _, _, _ in loaded])
    items = [
        ImageItem(name, stem, image, digest, str(path))
        for (name, image, digest, path), stem in zip(loaded, stems, strict=True)
    ]
    return items, skipped
