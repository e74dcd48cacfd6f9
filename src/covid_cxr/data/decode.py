"""Decode any supported image file (PNG, JPEG, DICOM) into one grayscale float channel.

Training, evaluation, Grad-CAM and the server all call `decode_gray` + `preprocess`, so a model sees
the same pixels wherever it runs. Every failure is a `DecodeError` with a human-readable reason; the
caller decides whether to skip (dataset scan) or answer 400 (server).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# 50 megapixels: far above any real radiograph (a 4k x 4k detector is 16 MP), far below a bomb.
DEFAULT_MAX_PIXELS = 50_000_000
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}

# What a model's input is, as the bundle's metadata describes it (read from here, never restated).
CHANNELS = 1
VALUE_RANGE = (0.0, 1.0)
COLOR = "grayscale: RGB by luminance, alpha over black; DICOM through its modality and VOI LUTs"
RESAMPLE = Image.Resampling.BILINEAR
RESIZE_METHOD = f"{RESAMPLE.name.lower()} (PIL, antialiased), no crop"


class DecodeError(ValueError):
    """The bytes are not an image we can read; `str(err)` says why."""


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # float32, H x W, values in [0, 1]
    format: str  # "PNG", "JPEG", "DICOM"
    width: int
    height: int


def _is_dicom(data: bytes) -> bool:
    return len(data) > 132 and data[128:132] == b"DICM"


def _decode_dicom(data: bytes, max_pixels: int) -> Decoded:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        rows, cols = int(ds.Rows), int(ds.Columns)
    except Exception as exc:  # pydicom raises many types for broken files
        raise DecodeError(f"unreadable DICOM: {exc}") from exc
    if rows * cols > max_pixels:
        raise DecodeError(f"too many pixels: {cols}x{rows} > {max_pixels}")
    try:
        arr = ds.pixel_array
    except Exception as exc:
        raise DecodeError(f"DICOM without readable pixel data: {exc}") from exc
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # colour DICOM (rare for CXR)
        arr = arr[..., :3].mean(axis=-1)
    elif arr.ndim != 2:
        raise DecodeError(f"unsupported DICOM pixel shape {arr.shape} (multi-frame?)")
    arr = apply_modality_lut(arr, ds)
    arr = apply_voi_lut(arr, ds, index=0)
    arr = arr.astype(np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        arr = 1.0 - arr  # MONOCHROME1: high values are dark
    return Decoded(arr, "DICOM", cols, rows)


def _decode_pil(data: bytes, max_pixels: int) -> Decoded:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format or "?"
            w, h = img.size
            if w * h > max_pixels:
                raise DecodeError(f"too many pixels: {w}x{h} > {max_pixels}")
            if fmt not in ("PNG", "JPEG"):
                raise DecodeError(f"unsupported image format {fmt}")
            img.load()  # forces full decode: catches truncated files
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(f"too many pixels (decompression bomb?): {exc}") from exc
    except UnidentifiedImageError as exc:
        raise DecodeError("not a PNG, JPEG or DICOM image") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DecodeError(f"not a readable image: {exc}") from exc

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        scale = 65535.0 if arr.max() > 255 or img.mode.startswith("I;16") else 255.0
        arr = arr / scale
    else:
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            bg = Image.new("RGBA", img.size, (0, 0, 0, 255))
            img = Image.alpha_composite(bg, img)
        arr = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    return Decoded(np.clip(arr, 0.0, 1.0), fmt, w, h)


def decode_gray(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode PNG (8/16-bit, any mode), JPEG or DICOM bytes into grayscale float32 in [0, 1]."""
    if not data:
        raise DecodeError("empty file")
    if _is_dicom(data):
        return _decode_dicom(data, max_pixels)
    return _decode_pil(data, max_pixels)


def decode_file(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DecodeError(f"cannot read file: {exc}") from exc
    return decode_gray(data, max_pixels)


def resize(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """RESAMPLE resize (PIL, antialiased) of a float [0, 1] H x W image; float32 out."""
    if pixels.shape == (height, width):
        return pixels.astype(np.float32, copy=False)
    img = Image.fromarray(pixels.astype(np.float32), mode="F")
    return np.asarray(img.resize((width, height), RESAMPLE), dtype=np.float32)


def load_for_model(source: str | Path | bytes, height: int, width: int,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """File path or encoded bytes -> float32 H x W in [0, 1], ready for the model's first layer."""
    dec = decode_gray(source, max_pixels) if isinstance(source, bytes) else decode_file(source, max_pixels)
    return resize(dec.pixels, height, width)


def load_batch(sources, height: int, width: int) -> np.ndarray:
    """Several files (or encoded images) -> float32 N x H x W: the decode-resize-stack every stage needs."""
    return np.stack([load_for_model(s, height, width) for s in sources]).astype(np.float32, copy=False)
