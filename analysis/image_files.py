"""How an image file (PNG, JPEG, ... or DICOM) becomes the (S, S, C) uint8 array an exported model's preprocessing
takes: the one reader `analysis.predict` uses, on a path or on raw bytes (what a served model receives).

The kind is decided by content, whatever the name: a DICOM Part 10 file carries `DICM` at byte 128; anything else
goes to PIL (PNG, JPEG, TIFF, ...), and only what PIL cannot read and is named *.dcm / *.dicom / *.dic is tried as a
bare DICOM data set (no preamble). Either way the last step is the training images' own
(`trainables.data.image_cache.sized_array`: mode conversion, bilinear resize), so a DICOM file whose pixels equal a
PNG's gives that PNG's input exactly.

DICOM pixels are turned into the 8-bit image a viewer would show, as the DICOM standard's grayscale pipeline does it
(pydicom's `apply_modality_lut` then `apply_voi_lut`, PS3.3 C.11): rescale slope/intercept or the modality LUT; then
the VOI LUT or the window (centre/width, LINEAR/LINEAR_EXACT/SIGMOID), whose output range is mapped linearly onto
0-255; without one, an image of 8 stored bits keeps its stored range (0-255 maps to itself, as an 8-bit PNG), and a
deeper one is stretched from its minimum to its maximum, as the image cache stretches a 16-bit PNG for training.
MONOCHROME1 (white = low values) is inverted last. Colour DICOM (RGB, YBR decoded to RGB by pydicom) of 8 bits
goes through unchanged. Multi-frame, palette-colour and compressed files without an installed decoder are refused
with one line naming the fix.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from trainables.data.image_cache import READ_ERRORS, decode_image, sized_array
from trainables.errors import UserError

DICOM_MAGIC, DICOM_MAGIC_AT = b"DICM", 128  # DICOM PS3.10 7.1: a 128-byte preamble, then "DICM"
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")  # named DICOM: read as a bare data set when the preamble is missing
EXPORT_EXTRA = "pip install -e '.[export]'"


def read_image(source: str | os.PathLike | bytes, image_size: int, mode: str, name: str | None = None) -> np.ndarray:
    """A path or the bytes of an image file -> (S, S, C) uint8 in `mode` ("L" or "RGB"), as training prepared its
    images. Anything unreadable is one UserError naming `name` (default: the path, or "the image bytes")."""
    name = name or (str(source) if not isinstance(source, bytes) else "the image bytes")

    def stream():
        return io.BytesIO(source) if isinstance(source, bytes) else source

    try:
        head = source[:DICOM_MAGIC_AT + 4] if isinstance(source, bytes) else _head(source)
        if head[DICOM_MAGIC_AT:DICOM_MAGIC_AT + 4] == DICOM_MAGIC:
            return sized_array(dicom_image(stream(), name, force=False), image_size, mode)
        try:
            return decode_image(stream(), image_size, mode)
        except READ_ERRORS:
            if isinstance(source, bytes) or Path(source).suffix.lower() not in DICOM_SUFFIXES:
                raise
        return sized_array(dicom_image(stream(), name, force=True), image_size, mode)  # a bare DICOM data set
    except READ_ERRORS as error:
        raise UserError(f"Cannot read image {name} ({type(error).__name__}: {str(error)[:120]}); "
                        "pass a readable image file (PNG, JPEG, DICOM, ...)") from error


def _head(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as file:
        return file.read(DICOM_MAGIC_AT + 4)


def dicom_image(source, name: str, force: bool) -> Image.Image:
    """A DICOM file (path or binary stream) -> the 8-bit PIL image ("L", or "RGB" for colour) a viewer shows."""
    try:
        import pydicom
        from pydicom.dataset import Dataset
        from pydicom.errors import InvalidDicomError
        from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
    except ImportError as error:
        raise UserError(f"Cannot read {name}: reading DICOM needs pydicom ({EXPORT_EXTRA})") from error
    try:
        ds = pydicom.dcmread(source, force=force)
    except (InvalidDicomError, EOFError) as error:
        raise UserError(f"Cannot read {name}: not a readable DICOM file ({str(error)[:120]}); pass a DICOM Part 10 "
                        "file, or a PNG/JPEG") from error
    if not any(key in ds for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise UserError(f"Cannot read {name}: the DICOM file has no pixel data (a structured report, a presentation "
                        "state, ...?); pass the image's own DICOM file")
    syntax = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
    if syntax is not None:
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError as error:
            raise UserError(f"Cannot read {name}: its pixel data is encoded as {syntax.name}, which pydicom cannot "
                            "decode; send it uncompressed (Explicit VR Little Endian)") from error
        if not decoder.is_available:
            raise UserError(f"Cannot read {name}: its pixel data is compressed as {syntax.name} and no installed "
                            f"decoder reads it; install one ({'; '.join(decoder.missing_dependencies)}) or send it "
                            "uncompressed")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise UserError(f"Cannot read {name}: it holds {ds.NumberOfFrames} frames; pass one image per file")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
        raise UserError(f"Cannot read {name}: palette-colour DICOM is not a radiograph this reader supports; "
                        "export it as greyscale or RGB")
    try:
        stored = ds.pixel_array
        if photometric not in ("MONOCHROME1", "MONOCHROME2"):  # colour: pydicom returns RGB
            if int(ds.BitsStored) > 8:
                raise UserError(f"Cannot read {name}: {ds.BitsStored}-bit colour DICOM is not supported; pass 8-bit "
                                "colour or greyscale")
            return Image.fromarray(np.ascontiguousarray(stored, np.uint8))  # (H, W, 3): RGB
        return Image.fromarray(display_pixels(stored, ds, apply_modality_lut, apply_voi_lut))  # (H, W): L
    except (AttributeError, KeyError, ValueError, TypeError, RuntimeError) as error:  # a tag missing or inconsistent
        raise UserError(f"Cannot read {name}: its pixel data does not decode ({type(error).__name__}: "
                        f"{str(error).splitlines()[0][:120]}); check the file with another DICOM viewer") from error


def display_pixels(stored: np.ndarray, ds, apply_modality_lut, apply_voi_lut) -> np.ndarray:
    """Greyscale stored values -> uint8 as displayed: modality LUT, VOI LUT / window onto 0-255, MONOCHROME1 inverted."""
    values = apply_modality_lut(stored, ds)
    windowed = apply_voi_lut(values, ds)
    if windowed is not values:  # a VOI LUT or a window (pydicom returns its input unchanged without one)
        low, high = voi_range(apply_voi_lut, values, ds)
        values = windowed
    elif int(ds.BitsStored) <= 8:  # 8 stored bits: the stored range, so 0-255 stays 0-255 (as an 8-bit PNG)
        low, high = sorted(float(v) for v in apply_modality_lut(np.array(stored_range(ds)), ds))
    else:  # deeper: stretched as the image cache stretches a 16-bit PNG for training (trainables.data.image_cache)
        low, high = float(values.min()), float(values.max())
    scaled = (np.asarray(values, np.float64) - low) * (255.0 / max(high - low, 1e-12))
    pixels = np.clip(np.round(scaled), 0, 255).astype(np.uint8)
    return 255 - pixels if str(ds.PhotometricInterpretation) == "MONOCHROME1" else pixels


def stored_range(ds) -> tuple[int, int]:
    """The lowest and highest value `BitsStored` bits hold (signed when PixelRepresentation is 1)."""
    bits = int(ds.BitsStored)
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if int(ds.get("PixelRepresentation", 0)) else (0, 2 ** bits - 1)


def voi_range(apply_voi_lut, values: np.ndarray, ds) -> tuple[float, float]:
    """The VOI transform's output range, so the window or LUT, not the image's own extremes, sets black and white,
    as on a viewer: a VOI LUT's entries span 0 to 2^n - 1 for n-bit entries (PS3.3 C.11.2.1.1; pydicom applies a
    valid LUT in preference to a window); a window's y_min and y_max are what pydicom maps values far below and far
    above it to (PS3.3 C.11.2.1.2, whichever of LINEAR, LINEAR_EXACT or SIGMOID)."""
    lut = ds.get("VOILUTSequence")
    if lut and lut[0].get("LUTDescriptor") is not None and lut[0].get("LUTData") is not None:
        return 0.0, float(2 ** int(lut[0].LUTDescriptor[2]) - 1)
    far = int(max(abs(float(np.min(values))), abs(float(np.max(values))), 1.0)) * 1000 + 1
    with np.errstate(over="ignore"):  # SIGMOID's exp at the far ends
        ends = np.asarray(apply_voi_lut(np.array([-far, far], np.int64), ds), np.float64)
    return float(ends.min()), float(ends.max())
