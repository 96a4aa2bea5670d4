"""Decode once: image files -> one uint8 (N, S, S, C) array in a memory-mapped .npy cache.

    cached = cached_images(files, image_size=64, channels="auto")
    rows = cached.usable_rows(skip_bad_images=False)   # UserError naming the first unreadable file

The cache lives in $MEDTUNE_CACHE_DIR (default ~/.cache/medtune) under a key that hashes the file
listing (path, size, mtime of every file, in the given order), the image size, the channel option
and CACHE_FORMAT. A changed, added or removed file is a new key, so a stale cache is never read.
Trials starting together build it once (FileLock); the build writes a temp file and renames it, so a
killed build leaves no half-written cache. A later load memory-maps the file read-only and decodes nothing: its
pages are the OS page cache, one copy per node however many processes read it (none of it is anonymous memory).
Each call prints one line to stdout: `image cache: built|reusing N decoded images at PATH`.

Preprocessing (bump CACHE_FORMAT when it changes): transparent images are composited on black,
16-bit greyscale is stretched to 0-255, then the image is converted to L (1 channel) or RGB
(3 channels) and squashed to S x S (aspect ratio not kept, as in MedMNIST) with bilinear filtering;
JPEGs are decoded at a reduced DCT scale (PIL `draft`) when they are much larger than S.
`channels="auto"` picks 1 unless most of a sample of images are genuinely colour (see `guess_channels`).

Unreadable files (corrupt, truncated, not an image, missing) are recorded in the cache with the
reason, so `usable_rows` can fail with one line or, with `skip_bad_images`, leave them out, and a
re-run with `--skip-bad-images` reuses the cache instead of decoding again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from filelock import FileLock
from numpy.lib.format import open_memmap
from PIL import Image
from tqdm import tqdm

from trainables.errors import UserError

CACHE_FORMAT = 1  # part of the key: bump when the preprocessing below changes
COLOUR_SPREAD = 4.0  # mean per-pixel max-min over R, G, B (0-255) above which an image counts as colour
COLOUR_SAMPLE = 32  # images probed by `guess_channels`
_HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what PIL raises on bad files


def default_cache_dir() -> Path:
    """$MEDTUNE_CACHE_DIR, else ~/.cache/medtune: read at call time so tests can redirect it."""
    return Path(os.environ.get("MEDTUNE_CACHE_DIR") or Path.home() / ".cache" / "medtune").expanduser()


@dataclass(frozen=True)
class CachedImages:
    images: np.ndarray  # (N, S, S, C) uint8 memmap, row i = files[i]; rows of unreadable files are zero
    channels: int
    bad: tuple[tuple[int, str, str], ...]  # (row, file, reason) for every file that could not be read
    path: Path  # the .npy file
    decoded: int  # files decoded by this call: 0 when the cache was reused

    def usable_rows(self, skip_bad_images: bool = False) -> np.ndarray:
        """Rows of readable images; without `skip_bad_images`, any unreadable file is a UserError."""
        if self.bad and not skip_bad_images:
            _, file, reason = self.bad[0]
            more = f" (and {len(self.bad) - 1} more unreadable images)" if len(self.bad) > 1 else ""
            raise UserError(f"Cannot read image {file}: {reason}{more}; replace or remove it, "
                            f"or pass --skip-bad-images to leave unreadable images out")
        keep = np.ones(len(self.images), bool)
        keep[[row for row, _, _ in self.bad]] = False
        return np.flatnonzero(keep)


def decode_image(path: str | os.PathLike | BinaryIO, image_size: int, mode: str) -> np.ndarray:
    """One file (or open binary stream) -> (S, S, C) uint8 in `mode` ("L" or "RGB"); PIL errors propagate."""
    with Image.open(path) as image:
        image.draft(mode, (image_size, image_size))  # JPEG only: decode at 1/2, 1/4, 1/8 scale when big enough
        return sized_array(image, image_size, mode)


def sized_array(image: Image.Image, image_size: int, mode: str) -> np.ndarray:
    """A decoded image -> (S, S, C) uint8 in `mode`: the conversion and resize every cached image had (also for
    pixels that reach PIL another way, e.g. a DICOM file's, in analysis.image_files)."""
    image = _to_mode(image, mode).resize((image_size, image_size), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
    """Convert any PIL mode to L or RGB without the two classic mistakes: clipped 16-bit, random alpha pixels."""
    if image.mode in _HIGH_BIT_MODES:  # PIL's own convert clips 16-bit values at 255
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        image = Image.fromarray(np.round((array - low) * (255.0 / max(high - low, 1e-12))).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return image.convert(mode)


def colour_spread(path: str | os.PathLike, image_size: int) -> float:
    """Mean over pixels of max(R,G,B) - min(R,G,B): ~0 for a grey X-ray saved as RGB, tens for a photo."""
    rgb = decode_image(path, image_size, "RGB").astype(np.int16)
    return float((rgb.max(axis=-1) - rgb.min(axis=-1)).mean())


def guess_channels(files: Sequence[str | os.PathLike], image_size: int) -> int:
    """3 when most of COLOUR_SAMPLE evenly spaced readable images are colour, else 1 (X-rays are grey)."""
    if not files:
        return 1
    probe = np.unique(np.linspace(0, len(files) - 1, min(len(files), COLOUR_SAMPLE)).round().astype(int))
    spreads = []
    for row in probe:
        try:
            spreads.append(colour_spread(files[row], image_size))
        except READ_ERRORS:
            continue  # the build reports it
    colour = sum(spread > COLOUR_SPREAD for spread in spreads)
    return 3 if spreads and colour * 2 > len(spreads) else 1


def cache_key(files: Sequence[str | os.PathLike], image_size: int, channels: int | str) -> str:
    """sha256 of the listing (absolute path, size, mtime in order) and the preprocessing options."""
    digest = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "size": image_size, "channels": channels}).encode())
    for file in files:
        path = os.path.abspath(file)
        try:
            stat = os.stat(path)
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()[:32]


def cached_images(files: Sequence[str | os.PathLike], *, image_size: int, channels: int | str = "auto",
                  cache_dir: str | os.PathLike | None = None) -> CachedImages:
    """The decoded images of `files` (in order), from the cache when it exists, else built once and saved."""
    if channels not in ("auto", 1, 3):
        raise UserError(f"Invalid channels {channels!r}; use auto, 1 (grey) or 3 (colour)")
    if not files:
        raise UserError("No image files to read; check the dataset path")
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    key = cache_key(files, image_size, channels)
    npy, meta = root / f"{key}.npy", root / f"{key}.json"
    cached = _open(npy, meta, len(files), image_size)
    if cached is None:
        with FileLock(str(root / f"{key}.lock")):
            cached = _open(npy, meta, len(files), image_size)  # another trial may have built it meanwhile
            if cached is None:
                _build([os.fspath(f) for f in files], image_size, channels, npy, meta)
                cached = _open(npy, meta, len(files), image_size, decoded=len(files))
    print(announcement(cached), flush=True)
    return cached


def announcement(cached: CachedImages) -> str:
    """One line saying whether the images were decoded now or reused, and where they are: a user who wonders
    why a changed image did not take effect (or why nothing was decoded) sees which file was read."""
    unreadable = f" ({len(cached.bad):,} unreadable)" if cached.bad else ""
    if cached.decoded:
        return f"image cache: built {cached.decoded:,} decoded images{unreadable} at {cached.path}"
    return f"image cache: reusing {len(cached.images):,} decoded images{unreadable} at {cached.path}"


def _open(npy: Path, meta: Path, count: int, image_size: int, decoded: int = 0) -> CachedImages | None:
    """A finished cache (its .json is written last), or None when absent or not what the key promises."""
    if not (meta.exists() and npy.exists()):
        return None
    try:
        info = json.loads(meta.read_text())
        images = np.load(npy, mmap_mode="r")  # read-only: page cache shared by every process of the node
    except (OSError, ValueError):
        return None
    if images.shape != (count, image_size, image_size, info["channels"]):
        return None
    bad = tuple((int(row), str(file), str(reason)) for row, file, reason in info["bad"])
    return CachedImages(images, int(info["channels"]), bad, npy, decoded)


def _try_decode(args: tuple[str, int, str]) -> tuple[np.ndarray | None, str | None]:
    """(image, None) or (None, one-line reason): a bad file must not stop the other threads."""
    path, image_size, mode = args
    try:
        return decode_image(path, image_size, mode), None
    except FileNotFoundError:
        return None, "file not found"
    except READ_ERRORS as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        return None, f"{type(error).__name__}: {reason}"


def _build(files: list[str], image_size: int, channels: int | str, npy: Path, meta: Path) -> None:
    """Decode every file into a temp .npy with a progress bar, then rename it and its metadata into place."""
    channels = guess_channels(files, image_size) if channels == "auto" else int(channels)
    mode = "L" if channels == 1 else "RGB"
    temp_npy = npy.with_name(f"{npy.stem}.{os.getpid()}.tmp.npy")
    out = open_memmap(temp_npy, mode="w+", dtype=np.uint8, shape=(len(files), image_size, image_size, channels))
    bad = []
    jobs = ((file, image_size, mode) for file in files)
    workers = min(8, os.cpu_count() or 1)  # PIL releases the GIL while decoding and resizing
    try:
        with ThreadPoolExecutor(workers) as pool, tqdm(total=len(files), unit="img", mininterval=1.0,
                                                       desc=f"Caching images at {image_size}x{image_size}") as bar:
            for row, (image, reason) in enumerate(pool.map(_try_decode, jobs)):
                if image is None:
                    bad.append((row, files[row], reason))
                else:
                    out[row] = image
                bar.update()
        out.flush()
        del out
        os.replace(temp_npy, npy)
    finally:
        temp_npy.unlink(missing_ok=True)
    temp_meta = meta.with_name(f"{meta.stem}.{os.getpid()}.tmp.json")
    temp_meta.write_text(json.dumps({"format": CACHE_FORMAT, "image_size": image_size, "channels": channels,
                                     "count": len(files), "bad": bad, "first_file": files[0]}))
    os.replace(temp_meta, meta)
