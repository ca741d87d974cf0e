"""Image sources for experiments: bundled sample photos and folders of user images.

A source is listed first (`ImageSet`: paths, names, true labels, shards; nothing read) and
decoded one image at a time while the study runs. Everything here is plain numpy + Pillow.
Every image comes back as an HxWx3 ``uint8`` RGB array with its EXIF orientation applied and
its longest side capped at ``MAX_SIDE``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import io
import itertools
import os
import queue
import re
import stat
import threading
import unicodedata
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    from xai_exp.config import DataConfig

SUPPORTED_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MAX_SIDE = 2048  # images larger than this on their longest side are downscaled ON LOAD

# Pillow formats we accept, whatever the file's extension says. Restricting the list keeps
# Pillow from handing odd files to plugins such as EPS (which runs Ghostscript).
_ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "DIB", "WEBP", "TIFF")  # JPEG covers MPO
# Used when Image.MAX_IMAGE_PIXELS has been disabled (set to None) by someone else.
_FALLBACK_MAX_PIXELS = 89_478_485
READ_TIMEOUT_S = 60.0  # a file not read and decoded within this is skipped (data.read_timeout_s)
_CHUNK = 2**20
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
    label: str | None = None  # the true class as the data names it (folder, synset, manifest)
    object_mask: np.ndarray | None = None  # HxW bool, the annotated object (data.masks_dir/boxes)


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
    shown = display_path(path)
    return ImageLoadError(f"cannot load image {shown}: {reason}", path=shown, reason=reason)


def display_path(path: str | os.PathLike[str]) -> str:
    """A path as text that any output can hold: bytes that are not UTF-8 in a file name
    (Python keeps them as lone surrogates) are shown as ``\\xff`` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


_FILE_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a directory"),
)


def _not_regular(mode: int) -> str | None:
    """Why a file of this mode is not read (only regular files are), or None."""
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "a special file")
    return f"not a regular file ({kind}); only regular files are read"


def _open_regular(path: Path) -> IO[bytes]:
    """The file opened for reading, refused unless it is a regular file.

    It is opened without blocking, so a FIFO (which would wait for a writer forever) or a
    device is refused at once, then read normally.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise _load_error(path, "file not found") from None
    except IsADirectoryError:
        raise _load_error(path, "is a directory, not a file") from None
    except PermissionError:
        raise _load_error(path, "permission denied") from None
    except OSError as exc:
        raise _load_error(path, f"cannot open file ({exc.strerror or exc})") from None
    try:
        problem = _not_regular(os.fstat(fd).st_mode)
        if problem is not None:
            raise _load_error(path, problem)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


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


def _to_rgb(img: Image.Image, mode: str | None = None) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited over white.

    `mode` is the mode the file was decoded in, when `img` was converted since (16-bit data
    widened to ``I`` keeps the 16-bit scaling).
    """
    mode = mode or img.mode
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


def _pixel_limit(max_pixels: int | None) -> int:
    """The pixel budget: `max_pixels`, else Pillow's (its fallback when disabled)."""
    return max_pixels or Image.MAX_IMAGE_PIXELS or _FALLBACK_MAX_PIXELS


def _decode(
    data: bytes | IO[bytes], path: Path, max_side: int, max_pixels: int | None = None
) -> np.ndarray:
    """Decode file bytes (or an open file) into an HxWx3 uint8 array; raises ImageLoadError.

    The header's size is checked against the pixel budget (`max_pixels`) before any pixel is
    decoded.
    """
    if isinstance(data, bytes) and not data:
        raise _load_error(path, "empty file")
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    fmt = "image"
    try:
        with warnings.catch_warnings():
            # the pixel budget below replaces Pillow's warning; its hard limit (twice its
            # MAX_IMAGE_PIXELS) still raises DecompressionBombError at open
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source, formats=_ALLOWED_FORMATS) as img:
                fmt = img.format or fmt
                width, height = img.size
                limit = _pixel_limit(max_pixels)
                if width * height > limit:
                    raise _load_error(
                        path,
                        f"{fmt} of {width}x{height} = {width * height:,} pixels, above the "
                        f"pixel budget data.max_pixels={limit:,} (not decoded)",
                    )
                if width < 1 or height < 1:
                    raise _load_error(path, f"{fmt} has no pixels ({width}x{height})")
                if fmt in ("JPEG", "MPO") and max(width, height) > max_side:
                    # Let libjpeg decode at 1/2, 1/4 or 1/8 scale: no full-size intermediate.
                    scale = max_side / max(width, height)
                    img.draft(img.mode, (max(1, int(width * scale)), max(1, int(height * scale))))
                img.load()  # full decode now, so truncated files fail here
                mode = img.mode
                oriented = _shrink_deep(img, max_side) or _exif_transpose(img)
                rgb = _to_rgb(oriented, mode)
                if max(rgb.size) > max_side:
                    rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
                array = np.array(rgb, dtype=np.uint8)  # a writable copy
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        raise _load_error(
            path,
            f"{fmt} above the pixel budget data.max_pixels={_pixel_limit(max_pixels):,} "
            f"(not decoded; Pillow: {exc})",
        ) from None
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


# EXIF orientation -> the transpose that shows the stored pixels upright (PIL's exif_transpose)
EXIF_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _shrink_deep(img: Image.Image, max_side: int) -> Image.Image | None:
    """A 16/32-bit or float image above `max_side`, box-reduced in Pillow to at most
    `max_side` and turned by its EXIF orientation; None for any other image.

    Such pixels are rescaled to 8 bits in numpy (float64 temporaries): reducing first keeps
    that work, and the peak memory, to the output's size instead of the file's.
    """
    if not (img.mode.startswith("I") or img.mode == "F") or max(img.size) <= max_side:
        return None
    try:
        orientation = img.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - broken EXIF: keep the image as stored
        orientation = None
    work = img.convert("I") if img.mode.startswith("I;16") else img  # reduce needs I or F
    reduced = work.reduce(-(-max(img.size) // max_side))
    turn = EXIF_TRANSPOSES.get(orientation) if isinstance(orientation, int) else None
    return reduced.transpose(turn) if turn is not None else reduced


def _exif_transpose(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; malformed EXIF data leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(img) or img
    except Exception:  # noqa: BLE001 - broken EXIF: keep the image as stored
        return img


def _read_bytes(path: Path, max_bytes: int | None = None) -> bytes:
    """The file's bytes; a file longer than `max_bytes` is refused after reading that many."""
    with _open_regular(path) as file:
        data = _read_into(file, path, max_bytes, None)
    return data


def _read_into(file: IO[bytes], path: Path, max_bytes: int | None, digest: Any | None) -> bytes:
    """Read `file` in chunks: into `digest` when given (nothing kept), else returned whole."""
    kept: list[bytes] = []
    total = 0
    try:
        while chunk := file.read(_CHUNK):
            total += len(chunk)
            if max_bytes is not None and total > max_bytes:
                raise _load_error(path, f"file is larger than {max_bytes / 2**20:g} MB")
            if digest is None:
                kept.append(chunk)
            else:
                digest.update(chunk)
    except OSError as exc:
        raise _load_error(path, f"cannot read file ({exc.strerror or exc})") from None
    except MemoryError:
        raise _load_error(path, f"out of memory reading {total / 2**20:,.0f} MB") from None
    if total == 0:
        raise _load_error(path, "empty file")
    return b"".join(kept)


def _load_with_hash(
    path: Path, max_side: int, max_bytes: int | None = None, max_pixels: int | None = None
) -> tuple[np.ndarray, str]:
    """The decoded image and the SHA-256 of the file, reading the file as a stream.

    The file is hashed chunk by chunk and then decoded from disk, so memory holds the decoded
    pixels (bounded by the pixel budget), never the whole file: a huge file costs time only.
    """
    digest = hashlib.sha256()
    with _open_regular(path) as file:
        _read_into(file, path, max_bytes, digest)
        try:
            file.seek(0)
        except OSError as exc:
            raise _load_error(path, f"cannot read file ({exc.strerror or exc})") from None
        return _decode(file, path, max_side, max_pixels), digest.hexdigest()


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


# --------------------------------------------------------------------------- listing

# An ImageNet synset id (``n01443537``) inside a folder or file name.
SYNSET_ID = re.compile(r"(?<![A-Za-z0-9])n\d{8}(?!\d)")
# Header names of a manifest's file column (the first row is a header when its first cell is one).
_MANIFEST_FILE_HEADERS = frozenset(
    {"file", "filename", "file_name", "path", "image", "imageid", "image_id", "name"}
)
_MAX_MANIFEST_BYTES = 256 * 2**20


@dataclass(frozen=True)
class ImageFile:
    """One listed image file, not yet read: its path, display name, size and true label."""

    path: Path
    name: str  # relative to the data folder, ``/``-separated: unique within the study
    size: int = 0
    label: str | None = None
    label_from: str = ""  # folder | synset | manifest: where the label was found


class ImageSet:
    """The study's image files, listed up front and decoded one at a time when iterated.

    Iterating yields `ImageItem`s in listing order while a background thread decodes the next
    `prefetch` files, so memory holds a few images whatever the number of files. A file that
    fails to decode is appended to `skipped` (and passed to `on_skip`) and left out.
    """

    def __init__(
        self,
        files: Sequence[ImageFile],
        skipped: Sequence[SkippedFile] = (),
        *,
        max_bytes: int | None = None,
        prefetch: int = 2,
        label_conflicts: Sequence[str] = (),
        max_pixels: int | None = None,
        read_timeout_s: float | None = READ_TIMEOUT_S,
    ) -> None:
        self.files = list(files)
        self.skipped = list(skipped)
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels  # the pixel budget (None: Pillow's)
        self.read_timeout_s = read_timeout_s  # per file; None waits as long as a read takes
        self.prefetch = prefetch
        self.label_conflicts = list(label_conflicts)  # files whose manifest label lost
        self.stems = _unique_stems([file.name for file in self.files])
        self.on_skip: Callable[[SkippedFile], None] | None = None
        # object annotations: (path, name, (height, width)) -> HxW bool mask or None
        self.annotate: Callable[[Path, str, tuple[int, int]], np.ndarray | None] | None = None

    def __len__(self) -> int:
        return len(self.files)

    def labels(self) -> dict[str, list[str]]:
        """Each true label found, with the names of its files."""
        found: dict[str, list[str]] = {}
        for file in self.files:
            if file.label is not None:
                found.setdefault(file.label, []).append(file.name)
        return found

    def _load(self, index: int) -> tuple[ImageItem | SkippedFile, SkippedFile | None]:
        """The decoded image (or why not), and why its annotation is unusable (None if it is)."""
        file = self.files[index]
        shown = display_path(file.path)
        try:
            image, digest = _load_with_hash(file.path, MAX_SIDE, self.max_bytes, self.max_pixels)
        except ImageLoadError as exc:
            return SkippedFile(shown, exc.reason), None
        mask, problem = None, None
        if self.annotate is not None:
            try:
                mask = self.annotate(file.path, file.name, image.shape[:2])
            except Exception as error:  # noqa: BLE001 - the image goes on without its annotation
                problem = SkippedFile(shown, f"annotation unusable: {_one_line(str(error))}")
        item = ImageItem(file.name, self.stems[index], image, digest, shown, file.label, mask)
        return item, problem

    def _timed_out(self, index: int) -> SkippedFile:
        return SkippedFile(
            display_path(self.files[index].path),
            f"not read within data.read_timeout_s={self.read_timeout_s:g} s (a hung network "
            "filesystem or device?); skipped, its read abandoned",
        )

    def __iter__(self) -> Iterator[ImageItem]:
        worker = _Worker()
        pending: deque[tuple[int, Future[tuple[ImageItem | SkippedFile, SkippedFile | None]]]]
        pending = deque()
        upcoming = iter(range(len(self.files)))
        try:
            for index in itertools.islice(upcoming, self.prefetch + 1):
                pending.append((index, worker.submit(self._load, index)))
            while pending:
                index, future = pending.popleft()
                try:
                    loaded, problem = future.result(timeout=self.read_timeout_s)
                except TimeoutError:
                    # The worker is stuck in this file's read: leave it (a daemon thread) and
                    # give the files after it to a fresh one.
                    loaded, problem = self._timed_out(index), None
                    worker.stop()
                    worker = _Worker()
                    pending = deque((i, worker.submit(self._load, i)) for i, _ in pending)
                for index in itertools.islice(upcoming, 1):
                    pending.append((index, worker.submit(self._load, index)))
                for skipped in (loaded, problem):
                    if isinstance(skipped, SkippedFile):
                        self.skipped.append(skipped)
                        if self.on_skip is not None:
                            self.on_skip(skipped)
                if isinstance(loaded, ImageItem):
                    yield loaded
        finally:
            worker.stop()


class _Worker:
    """One daemon thread running submitted calls in order.

    Unlike a ThreadPoolExecutor's thread it is never joined at exit, so a read blocked for
    good (a hung network filesystem) cannot keep the process alive after SIGTERM.
    """

    def __init__(self) -> None:
        self.tasks: queue.SimpleQueue[
            tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None
        ]
        self.tasks = queue.SimpleQueue()
        self.queued: list[Future[Any]] = []
        threading.Thread(target=self._work, name="xai-exp-decode", daemon=True).start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self.queued = [queued for queued in self.queued if not queued.done()]
        self.queued.append(future)
        self.tasks.put((future, fn, args))
        return future

    def stop(self) -> None:
        """Cancel what has not started; the thread ends after the call it is in."""
        for future in self.queued:
            future.cancel()
        self.queued.clear()
        self.tasks.put(None)

    def _work(self) -> None:
        while (task := self.tasks.get()) is not None:
            future, fn, args = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as error:  # noqa: BLE001 - handed to the waiting thread
                future.set_exception(error)


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


def bundled_set() -> ImageSet:
    """The six sample photos shipped inside scikit-image and matplotlib (nothing downloaded).

    Order: astronaut, chelsea, coffee, rocket, motorcycle_left, grace_hopper.
    """
    files = [
        ImageFile(_package_file(package, relative), name) for package, relative, name in _BUNDLED
    ]
    return ImageSet(files)


def check_folder(directory: str | Path) -> Path:
    """The folder (``~`` expanded), or a DataError when it is missing or not a folder."""
    folder = Path(directory).expanduser()
    hint = "(set data.dir=PATH to a folder of images)"
    if not folder.exists():
        raise DataError(f"data folder not found: {folder} {hint}")
    if not folder.is_dir():
        raise DataError(f"data folder is not a directory: {folder} {hint}")
    return folder


def _name_key(name: str) -> tuple[str, str]:
    return (name.casefold(), name)


def _scan(
    folder: Path,
    recursive: bool,
    max_bytes: int | None,
    exclude: Path | None,
    follow_external: bool = False,
) -> tuple[list[ImageFile], list[SkippedFile]]:
    """Every image file under `folder` (one level, or the whole tree), with what was left out.

    Hidden files and folders are ignored; other non-images, files that are not regular files
    (FIFOs, sockets, devices), files above `max_bytes` (by size, never read) and class folders
    without images are returned as skipped. Symlinks that resolve inside the folder are
    followed (folders once each); those pointing outside it are skipped unless
    `follow_external`. Names with bytes that are not UTF-8 are listed with ``\\xff`` escapes.
    """
    images: list[ImageFile] = []
    skipped: list[SkippedFile] = []
    seen: set[tuple[int, int]] = set()
    supported = ", ".join(SUPPORTED_EXTENSIONS)
    root = folder.resolve()

    def visit(directory: Path, parts: tuple[str, ...]) -> None:
        try:
            info = directory.stat()
            if (info.st_dev, info.st_ino) in seen:
                return
            seen.add((info.st_dev, info.st_ino))
            entries = sorted(os.scandir(directory), key=lambda e: _name_key(e.name))
        except OSError as exc:
            if not parts:
                raise DataError(
                    f"cannot list data folder {display_path(directory)}: {exc.strerror or exc}"
                ) from None
            skipped.append(
                SkippedFile(display_path(directory), f"cannot list folder ({exc.strerror})")
            )
            return
        before = len(images)
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            shown = display_path(path)
            try:
                if entry.is_symlink() and not follow_external:
                    target = path.resolve()
                    if not target.is_relative_to(root):
                        skipped.append(
                            SkippedFile(
                                shown,
                                f"symlink to {display_path(target)}, outside the data folder "
                                "(not followed; data.follow_external_symlinks=true follows it)",
                            )
                        )
                        continue
                is_dir = entry.is_dir()
                if is_dir:
                    if recursive:
                        visit(path, (*parts, display_path(entry.name)))
                    continue
                info = entry.stat()
            except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (resolve)
                reason = getattr(exc, "strerror", None) or _one_line(str(exc))
                skipped.append(SkippedFile(shown, f"cannot read ({reason})"))
                continue
            extension = os.path.splitext(entry.name)[1].lower()
            if exclude is not None and path.resolve() == exclude:
                continue
            special = _not_regular(info.st_mode)
            if special is not None:
                skipped.append(SkippedFile(shown, special))
            elif extension not in SUPPORTED_EXTENSIONS:
                kind = f"{extension} file" if extension else "file without extension"
                kind = display_path(kind)
                skipped.append(SkippedFile(shown, f"not an image ({kind}; read: {supported})"))
            elif max_bytes is not None and info.st_size > max_bytes:
                skipped.append(
                    SkippedFile(
                        shown,
                        f"{info.st_size / 2**20:,.0f} MB, above data.max_file_mb="
                        f"{max_bytes / 2**20:g} (not read; raise it to include the file)",
                    )
                )
            else:
                name = "/".join((*parts, display_path(entry.name)))
                images.append(ImageFile(path, name, info.st_size))
        if len(parts) == 1 and len(images) == before:
            skipped.append(SkippedFile(display_path(directory), "class folder without images"))

    visit(folder, ())
    images.sort(key=lambda file: _name_key(file.name))
    return images, skipped


def path_label(name: str) -> tuple[str | None, str]:
    """The true label a relative path carries, and where it was found.

    The first folder (``ImageFolder`` layout: ``goldfish/1.jpg``, ``n01443537/x.JPEG``) comes
    first; for a file at the top of the folder, an ImageNet synset id in its file name
    (``n01443537_10007.JPEG``). None when neither is there.
    """
    parts = name.split("/")
    if len(parts) > 1:
        return parts[0], "folder"
    found = SYNSET_ID.search(parts[-1])
    return (found.group(0), "synset") if found else (None, "")


def read_manifest(path: str | Path) -> dict[str, str]:
    """``file -> label`` from a manifest CSV (two columns: file, label; a header is optional).

    File names may be relative to the data folder, bare file names or stems (ImageNet's
    ``LOC_val_solution.csv`` works as it is: its label cell starts with the synset id).
    Raises DataError, one line, when the file is missing or is not such a CSV.
    """
    manifest = Path(path).expanduser()
    try:
        with manifest.open("rb") as file:
            raw = file.read(_MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise DataError(f"cannot read the manifest {manifest}: {exc.strerror or exc}") from None
    problem = None
    if len(raw) > _MAX_MANIFEST_BYTES:
        problem = f"larger than {_MAX_MANIFEST_BYTES // 2**20} MB"
    elif b"\x00" in raw:
        problem = "binary data"
    rows: list[list[str]] = []
    if problem is None:
        try:
            rows = [
                [cell.strip() for cell in row]
                for row in csv.reader(io.StringIO(raw.decode("utf-8-sig")))
                if any(cell.strip() for cell in row)
            ]
        except (UnicodeDecodeError, csv.Error) as exc:
            problem = _one_line(str(exc))
    if problem is None:
        short = next((n for n, row in enumerate(rows, 1) if len(row) < 2), None)
        if not rows:
            problem = "no rows"
        elif short is not None:
            problem = f"row {short} has one column"
    if problem is not None:
        raise DataError(
            f"the manifest {manifest} is not a CSV of file,label rows ({problem}); "
            "fix it or drop data.manifest"
        )
    if rows[0][0].casefold() in _MANIFEST_FILE_HEADERS:
        rows = rows[1:]
    return {row[0].replace("\\", "/"): row[1] for row in rows}


def name_keys(name: str) -> tuple[str, ...]:
    """How a list file (manifest, boxes) may name an image: its relative path, file name, stem."""
    base = name.rsplit("/", 1)[-1]
    return tuple(dict.fromkeys((name, base, os.path.splitext(base)[0])))


def _manifest_labels(
    manifest: dict[str, str], files: Sequence[ImageFile], folder: Path
) -> tuple[dict[str, str], list[SkippedFile]]:
    """Manifest labels by file name, and the manifest entries that name no listed file."""
    by_key: dict[str, str | None] = {}
    for file in files:  # a relative path, a bare file name or a stem; ambiguous ones unused
        for key in name_keys(file.name):
            by_key[key] = file.name if key not in by_key else None
    labels: dict[str, str] = {}
    missing: list[SkippedFile] = []
    for key, label in manifest.items():
        candidate = Path(key)
        if candidate.is_absolute() and candidate.is_relative_to(folder):
            key = candidate.relative_to(folder).as_posix()
        name = by_key.get(key)
        if name is None:
            missing.append(SkippedFile(key, "named in the manifest, not found in the data folder"))
        else:
            labels[name] = label
    return labels, missing


def list_folder(
    directory: str | Path,
    recursive: bool = True,
    manifest: str | Path | None = None,
    max_file_mb: float | None = None,
    *,
    max_pixels: int | None = None,
    read_timeout_s: float | None = READ_TIMEOUT_S,
    follow_external_symlinks: bool = False,
) -> ImageSet:
    """The image files under `directory` with their true labels, sorted by relative path.

    Labels, in order of precedence: the class folder's name, an ImageNet synset id in a top
    level file's name (`path_label`), the `manifest` CSV (`read_manifest`). Non-images, files
    above `max_file_mb` (never read), empty class folders and manifest rows naming no file are
    in `skipped`. A manifest that is not a CSV is skipped the same way (the study goes on
    without its labels). Raises DataError when the folder is missing or holds no image file.
    """
    folder = check_folder(directory)
    max_bytes = None if max_file_mb is None else int(max_file_mb * 2**20)
    manifest_path = Path(manifest).expanduser().resolve() if manifest else None
    files, skipped = _scan(folder, recursive, max_bytes, manifest_path, follow_external_symlinks)
    if not files:
        supported = ", ".join(SUPPORTED_EXTENSIONS)
        detail = f"; skipped: {_summarise_skipped(skipped)}" if skipped else ""
        raise DataError(f"no images found in data folder {folder} (read: {supported}){detail}")
    from_manifest: dict[str, str] = {}
    if manifest_path is not None:
        try:
            from_manifest, missing = _manifest_labels(read_manifest(manifest_path), files, folder)
            skipped += missing
        except DataError as error:
            skipped.append(SkippedFile(str(manifest_path), str(error)))
    labelled, conflicts = [], []
    for file in files:
        label, source = path_label(file.name)
        listed = from_manifest.get(file.name)
        if label is None and listed is not None:
            label, source = listed, "manifest"
        elif listed is not None and listed != label:
            conflicts.append(file.name)
        labelled.append(dataclasses.replace(file, label=label, label_from=source))
    return ImageSet(
        labelled,
        skipped,
        max_bytes=max_bytes,
        label_conflicts=conflicts,
        max_pixels=max_pixels,
        read_timeout_s=read_timeout_s,
    )


def shard_of(name: str, num_shards: int) -> int:
    """The shard (0..num_shards-1) a file belongs to: a hash of its name, stable across jobs."""
    digest = hashlib.sha1(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def select(
    images: ImageSet, limit: int | None = None, num_shards: int = 1, shard: int = 0
) -> ImageSet:
    """The first `limit` files, then the files of one shard (`shard_of`).

    Shards of the same listing partition it: every file is in exactly one. Files skipped while
    listing go to the shard of their path too, so each is reported once.
    """
    _check_limit(limit)
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in 0..{num_shards - 1}, got {shard}")
    files = images.files[:limit]
    skipped = images.skipped
    if num_shards > 1:
        files = [file for file in files if shard_of(file.name, num_shards) == shard]
        skipped = [s for s in skipped if shard_of(s.path, num_shards) == shard]
    kept = {file.name for file in files}
    selected = ImageSet(
        files,
        skipped,
        max_bytes=images.max_bytes,
        prefetch=images.prefetch,
        label_conflicts=[name for name in images.label_conflicts if name in kept],
        max_pixels=images.max_pixels,
        read_timeout_s=images.read_timeout_s,
    )
    selected.annotate = images.annotate
    return selected


def _check_folder_source(cfg: DataConfig) -> None:
    if not cfg.dir:
        raise DataError("data=folder needs data.dir=PATH (a folder of images)")
    check_folder(cfg.dir)
    if cfg.manifest and not Path(cfg.manifest).expanduser().is_file():
        raise DataError(f"data.manifest={cfg.manifest} is not a file (a CSV of file,label rows)")


def _open_folder(cfg: DataConfig) -> ImageSet:
    assert cfg.dir is not None
    return list_folder(
        cfg.dir,
        cfg.recursive,
        cfg.manifest,
        cfg.max_file_mb,
        max_pixels=cfg.max_pixels,
        read_timeout_s=cfg.read_timeout_s,
        follow_external_symlinks=cfg.follow_external_symlinks,
    )


def _open_bundled(cfg: DataConfig) -> ImageSet:
    images = bundled_set()
    images.max_pixels, images.read_timeout_s = cfg.max_pixels, cfg.read_timeout_s
    return images


@dataclass(frozen=True)
class DataSource:
    """One `data.source`: its cheap checks (before any compute), how it lists its images
    (listed, not read) and its name in run names."""

    check: Callable[[DataConfig], None]
    open: Callable[[DataConfig], ImageSet]
    name: Callable[[DataConfig], str]


SOURCES: dict[str, DataSource] = {
    "bundled": DataSource(lambda cfg: None, _open_bundled, lambda cfg: "bundled"),
    "folder": DataSource(
        _check_folder_source, _open_folder, lambda cfg: Path(cfg.dir or "folder").name
    ),
}


def data_source(cfg: DataConfig) -> DataSource:
    """The configured source; DataError for one no module registered in `SOURCES`."""
    source = SOURCES.get(cfg.source)
    if source is None:
        raise DataError(f"data.source={cfg.source!r} is not one of {', '.join(SOURCES)}")
    return source


def open_images(cfg: DataConfig) -> ImageSet:
    """The configured images (listed, not read), or a DataError before any compute."""
    source = data_source(cfg)
    source.check(cfg)
    return select(source.open(cfg), cfg.limit, cfg.num_shards, cfg.shard)


def _summarise_skipped(skipped: list[SkippedFile], shown: int = 3) -> str:
    parts = [f"{Path(s.path).name}: {s.reason}" for s in skipped[:shown]]
    if len(skipped) > shown:
        parts.append(f"and {len(skipped) - shown} more")
    return _one_line("; ".join(parts))


def no_valid_images(images: ImageSet, where: str) -> DataError:
    """The error for a study whose every file failed to decode."""
    return DataError(
        f"no valid images in {where}: {len(images.skipped)} file(s) skipped "
        f"({_summarise_skipped(images.skipped)})"
    )


# --------------------------------------------------------------------------- eager helpers


def bundled_images(limit: int | None = None) -> list[ImageItem]:
    """The bundled photos, decoded (`bundled_set`); ``limit`` keeps the first N."""
    images = select(bundled_set(), limit)
    items = list(images)
    if images.skipped:
        raise DataError(f"bundled image unreadable: {_summarise_skipped(images.skipped)}")
    return items


def folder_images(
    directory: str | Path, limit: int | None = None, recursive: bool = True
) -> tuple[list[ImageItem], list[SkippedFile]]:
    """The images of a folder, decoded (`list_folder`), and every file left out.

    ``limit`` keeps the first N files. Raises DataError if none decodes.
    """
    images = select(list_folder(directory, recursive), limit)
    items = list(images)
    if not items:
        raise no_valid_images(images, f"data folder {Path(directory).expanduser()}")
    return items, images.skipped
