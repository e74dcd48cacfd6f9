"""Decode any supported image file (PNG, JPEG, DICOM) into one grayscale float channel.

Training, evaluation, Grad-CAM and the server all call `load_for_model`, so a model sees the same
pixels wherever it runs. Every failure is a `DecodeError` with a human-readable reason; the caller
decides whether to skip (dataset scan) or answer 400 (server).

Memory is bounded by what the model needs, not by the file: given a target size, a JPEG is decoded
at a reduced scale (libjpeg's DCT scaling, `Image.draft`), and a PNG or DICOM is box-reduced by an
integer factor on its 8/16-bit pixels, before any float32 copy exists. The reduction always leaves
at least `REDUCING_GAP` times the target size, where PIL documents the two-step result as
indistinguishable from a full-resolution resize ("fair resampling"); images under three times the
target (every image of the COVID-19 Radiography Database) are not reduced at all.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
import zlib
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# 20 megapixels: takes the largest real radiographs (4,300 x 4,300 detectors, 18.5 MP) and bounds
# what one decode may cost (a 16-bit or RGBA picture of 20 MP is 40-80 MB before any reduction).
DEFAULT_MAX_PIXELS = 20_000_000
REDUCING_GAP = 3.0
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}

# A progressive JPEG decodes its whole frame once per scan: real ones have about 10 scans (baseline:
# 1), a hostile one 10,000 (a 428 kB file held two decode slots 43 s). Counted before decoding.
MAX_JPEG_SCANS = 100
# Huffman-coded JPEG spends at least one bit per 8x8 block of its largest component in its DC scan;
# a file with less entropy-coded data than one bit per 16 blocks (a margin for subsampling) cannot
# hold the picture its header claims: libjpeg would fill the rest with grey and answer anyway.
MIN_BLOCKS_PER_BIT = 16
_ARITHMETIC_SOF = {0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# Deflated DICOM (1.2.840.10008.1.2.1.99) is inflated by us, at most this many bytes per allowed
# pixel (16-bit RGBA plus headers fit), so a 1 MB file cannot become 1 GiB before any cap applies.
DEFLATED_DICOM = "1.2.840.10008.1.2.1.99"
DEFLATE_BYTES_PER_PIXEL = 4
DEFLATE_SLACK = 1 << 20

# What a model's input is, as the bundle's metadata describes it (read from here, never restated).
CHANNELS = 1
VALUE_RANGE = (0.0, 1.0)
COLOR = "grayscale: RGB by luminance, alpha over black; DICOM through its modality and VOI LUTs"
RESAMPLE = Image.Resampling.BILINEAR
RESIZE_METHOD = f"{RESAMPLE.name.lower()} (PIL, antialiased), no crop"
_REDUCIBLE = {"L", "LA", "RGB", "RGBA", "I", "F", "CMYK"}  # modes PIL's Image.reduce() takes

# `admit(pixels)`: a context held while an image of that many pixels is being decoded (the
# server's budget on concurrent decodes); called once the header has been read, before decoding.
Admit = Callable[[int], AbstractContextManager]


class DecodeError(ValueError):
    """The bytes are not an image we can read; `str(err)` says why."""


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # float32, H x W, values in [0, 1] (reduced when a target size was given)
    format: str  # "PNG", "JPEG", "DICOM"
    width: int  # of the file, before any reduction
    height: int


def _no_admit(pixels: int) -> AbstractContextManager:
    return nullcontext()


def reduce_factor(width: int, height: int, target: tuple[int, int] | None) -> int:
    """The integer box-reduction that still leaves REDUCING_GAP x the target (1: none). Uses the
    smaller side against the larger target side, so a later 90-degree turn cannot undercut it."""
    if target is None:
        return 1
    return max(1, int(min(width, height) / (REDUCING_GAP * max(target))))


def _block_mean(arr: np.ndarray, k: int) -> np.ndarray:
    """k x k box mean of an integer H x W (x C) array, rounded back to its dtype (LUTs index by it)."""
    if k <= 1:
        return arr
    h, w = arr.shape[0] // k * k, arr.shape[1] // k * k
    blocks = arr[:h, :w].reshape(h // k, k, w // k, k, *arr.shape[2:])  # a view: no full-size copy
    mean = blocks.mean(axis=(1, 3), dtype=np.float64)
    return np.rint(mean).astype(arr.dtype) if arr.dtype.kind in "iu" else mean.astype(arr.dtype)


# ---------------------------------------------------------------------------------- DICOM

def _is_dicom(data: bytes) -> bool:
    """Part-10 file (128-byte preamble + 'DICM'), or a bare data set starting with a group-2
    (file meta) or group-8 tag, as some archives write them."""
    return (len(data) > 132 and data[128:132] == b"DICM") or data[:2] in (b"\x02\x00", b"\x08\x00")


def _inflate_bounded(zipped: bytes, limit: int) -> bytes:
    """Raw deflate -> bytes, refusing (DecodeError) once more than `limit` bytes would come out:
    the memory spent is bounded by the limit, never by what the stream claims."""
    inflater, parts, size = zlib.decompressobj(-zlib.MAX_WBITS), [], 0
    try:
        while zipped and not inflater.eof:  # in 4 MiB pieces: no output buffer grown past the limit
            parts.append(inflater.decompress(zipped, min(4 << 20, limit + 1 - size)))
            size += len(parts[-1])
            if size > limit:
                raise DecodeError(f"deflated DICOM data set inflates beyond {limit} bytes (deflate bomb?)")
            zipped = inflater.unconsumed_tail
    except zlib.error as exc:
        raise DecodeError(f"unreadable deflated DICOM: {exc}") from None
    return b"".join(parts)


def _undeflate_dicom(data: bytes, max_pixels: int) -> bytes:
    """A deflated-transfer-syntax file rewritten as explicit VR little endian, inflated under a cap
    derived from the pixel cap (pydicom would inflate it whole, unbounded); other files unchanged."""
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.filewriter import write_file_meta_info
    from pydicom.filebase import DicomBytesIO
    from pydicom.uid import ExplicitVRLittleEndian

    fp = io.BytesIO(data)
    try:
        preamble = read_preamble(fp, force=data[128:132] != b"DICM")
        meta = _read_file_meta_info(fp)
    except Exception as exc:  # pydicom raises many types for broken files
        raise DecodeError(f"unreadable DICOM: {str(exc)[:200]}") from None
    if str(meta.get("TransferSyntaxUID", "")) != DEFLATED_DICOM:
        return data
    body = _inflate_bounded(data[fp.tell():], max_pixels * DEFLATE_BYTES_PER_PIXEL + DEFLATE_SLACK)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = DicomBytesIO()
    write_file_meta_info(out, meta, enforce_standard=False)
    return (preamble or b"\0" * 128) + b"DICM" + out.getvalue() + body


def _read_dicom(data: bytes, max_pixels: int):
    import pydicom

    data = _undeflate_dicom(data, max_pixels)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=data[128:132] != b"DICM")
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    except Exception as exc:  # pydicom raises many types for broken files
        raise DecodeError(f"unreadable DICOM: {str(exc)[:200]}") from None
    if rows * cols > max_pixels:
        raise DecodeError(f"too many pixels: {cols}x{rows} > {max_pixels}")
    if frames != 1 or rows <= 0 or cols <= 0:
        raise DecodeError(f"unsupported DICOM: {frames} frames of {cols}x{rows} (one 2-D image expected)")
    return ds, rows, cols


def _dicom_pixels(ds, k: int) -> np.ndarray:
    """Stored values -> reduced -> modality and VOI LUTs -> float32 [0, 1] (MONOCHROME1 inverted)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        arr = ds.pixel_array
    except Exception as exc:
        raise DecodeError(f"DICOM without readable pixel data: {str(exc)[:200]}") from None
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # colour DICOM (rare for CXR)
        arr = _block_mean(arr, k)[..., :3].mean(axis=-1)
    elif arr.ndim == 2:
        arr = _block_mean(arr, k)
    else:
        raise DecodeError(f"unsupported DICOM pixel shape {arr.shape} (multi-frame?)")
    try:
        arr = apply_voi_lut(apply_modality_lut(arr, ds), ds, index=0).astype(np.float32)
    except Exception as exc:
        raise DecodeError(f"DICOM with unusable LUTs: {str(exc)[:200]}") from None
    lo, hi = float(arr.min()), float(arr.max())
    arr = (arr - lo) / (hi - lo) if np.isfinite(hi - lo) and hi > lo else np.zeros_like(arr)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        arr = 1.0 - arr  # MONOCHROME1: high values are dark
    return arr


def _decode_dicom(data: bytes, max_pixels: int, target, admit: Admit) -> Decoded:
    ds, rows, cols = _read_dicom(data, max_pixels)
    with admit(rows * cols):
        arr = _dicom_pixels(ds, reduce_factor(cols, rows, target))
    return Decoded(arr, "DICOM", cols, rows)


# ---------------------------------------------------------------------------------- PNG / JPEG

def _entropy_end(data: bytes, i: int) -> int:
    """Where a scan's entropy-coded data starting at i ends: the next marker that is not a
    stuffed 0xFF00 or a restart marker."""
    n = len(data)
    while True:
        i = data.find(b"\xff", i)
        if i < 0 or i + 1 >= n:
            return n
        nxt = data[i + 1]
        if nxt == 0x00 or 0xD0 <= nxt <= 0xD7:
            i += 2
        elif nxt == 0xFF:
            i += 1  # fill byte before a marker
        else:
            return i


def jpeg_scans(data: bytes) -> tuple[int, int, bool]:
    """(scans, entropy-coded bytes, arithmetic-coded?) of a JPEG's first frame, from its marker
    segments alone (up to the first EOI: an MPO's later frames and EXIF thumbnails are not read).
    Refuses more than MAX_JPEG_SCANS scans as soon as it counts them."""
    i, n, scans, entropy, arithmetic = 2, len(data), 0, 0, False
    while i + 4 <= n and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF or 0xD0 <= marker <= 0xD7 or marker == 0x01:
            i += 1 if marker == 0xFF else 2
            continue
        if marker == 0xD9:  # EOI
            break
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
        arithmetic |= marker in _ARITHMETIC_SOF
        if marker == 0xDA:  # SOS: its entropy-coded data follows the header
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise DecodeError(f"JPEG with more than {MAX_JPEG_SCANS} scans (progressive scan bomb?)")
            end = _entropy_end(data, i)
            entropy, i = entropy + end - i, end
    return scans, entropy, arithmetic


def _check_jpeg(data: bytes, width: int, height: int) -> None:
    """Before decoding: a sane number of scans, and enough coded data for the size it claims."""
    scans, entropy, arithmetic = jpeg_scans(data)
    blocks = -(-width // 8) * -(-height // 8)
    if not arithmetic and entropy * 8 * MIN_BLOCKS_PER_BIT < blocks:
        raise DecodeError(f"truncated JPEG: {entropy} bytes of image data cannot hold {width}x{height} pixels")

def _open_pil(data: bytes, max_pixels: int) -> Image.Image:
    """Read the header only: format and size are checked before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(f"too many pixels (decompression bomb?): {exc}") from None
    except UnidentifiedImageError:
        raise DecodeError("not a PNG, JPEG or DICOM image") from None
    except (OSError, SyntaxError, ValueError, TypeError, EOFError) as exc:
        raise DecodeError(f"not a readable image: {exc}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise DecodeError(f"too many pixels: {w}x{h} > {max_pixels}")
    if img.format not in ("PNG", "JPEG", "MPO"):  # MPO: a phone's JPEG with extra frames (first decoded)
        raise DecodeError(f"unsupported image format {img.format or '?'}")
    if img.format != "PNG":
        _check_jpeg(data, w, h)
    return img


def _load_reduced(img: Image.Image, target) -> Image.Image:
    """Decode (a JPEG at reduced scale when it can), box-reduce, then turn as EXIF says."""
    if target is not None and img.format in ("JPEG", "MPO"):
        gap = int(REDUCING_GAP * max(target))
        img.draft("L", (gap, gap))  # libjpeg scales by 1/2..1/8, never below the size asked
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()  # forces the full decode: catches truncated files
        k = reduce_factor(*img.size, target)
        if k > 1 and img.mode in _REDUCIBLE:
            img = img.reduce(k)
        elif k > 1 and img.mode.startswith("I;16"):
            img = Image.fromarray(_block_mean(np.asarray(img), k))
        return ImageOps.exif_transpose(img)  # the picture as its viewer shows it
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(f"not a readable image: {exc}") from None


def _to_float(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> float32 gray in [0, 1]: 16-bit scaled by 65535, alpha composited over black."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        scale = 65535.0 if arr.max() > 255 or img.mode.startswith("I;16") else 255.0
        return np.clip(arr / scale, 0.0, 1.0)
    if img.mode == "F":
        return np.clip(np.nan_to_num(np.asarray(img, dtype=np.float32)), 0.0, 1.0)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img)
    return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def _decode_pil(data: bytes, max_pixels: int, target, admit: Admit) -> Decoded:
    img = _open_pil(data, max_pixels)
    w, h = img.size
    with admit(w * h):
        arr = _to_float(_load_reduced(img, target))
    return Decoded(arr, "JPEG" if img.format == "MPO" else img.format, w, h)


# ---------------------------------------------------------------------------------- entry points

def decode_gray(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, target: tuple[int, int] | None = None,
                admit: Admit | None = None) -> Decoded:
    """Decode PNG (8/16-bit, any mode), JPEG or DICOM bytes into grayscale float32 in [0, 1].

    `target` (height, width): the size the pixels are for; the decode may then return them reduced
    (never below REDUCING_GAP x target). Without it, full resolution (dataset statistics)."""
    if not data:
        raise DecodeError("empty file")
    admit = admit or _no_admit
    if _is_dicom(data):
        return _decode_dicom(data, max_pixels, target, admit)
    return _decode_pil(data, max_pixels, target, admit)


def read_regular(path: str | Path) -> bytes:
    """A file's bytes, refusing anything but a regular file: reading a FIFO or a device would block
    (or never end), so special files are reported as such instead of read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise DecodeError(f"cannot read file: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            kind = "FIFO" if stat.S_ISFIFO(mode) else "directory" if stat.S_ISDIR(mode) else "special file"
            raise DecodeError(f"not a regular file ({kind})")
        try:
            return f.read()
        except OSError as exc:
            raise DecodeError(f"cannot read file: {exc.strerror or exc}") from None


def decode_file(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS,
                target: tuple[int, int] | None = None) -> Decoded:
    return decode_gray(read_regular(path), max_pixels, target)


def resize(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """RESAMPLE resize (PIL, antialiased) of a float [0, 1] H x W image; float32 out."""
    if pixels.shape == (height, width):
        return pixels.astype(np.float32, copy=False)
    img = Image.fromarray(pixels.astype(np.float32), mode="F")
    return np.asarray(img.resize((width, height), RESAMPLE), dtype=np.float32)


def load_for_model(source: str | Path | bytes, height: int, width: int,
                   max_pixels: int = DEFAULT_MAX_PIXELS, admit: Admit | None = None) -> np.ndarray:
    """File path or encoded bytes -> float32 H x W in [0, 1], ready for the model's first layer."""
    data = source if isinstance(source, bytes) else read_regular(source)
    dec = decode_gray(data, max_pixels, (height, width), admit)
    return resize(dec.pixels, height, width)


def load_batch(sources, height: int, width: int) -> np.ndarray:
    """Several files (or encoded images) -> float32 N x H x W: the decode-resize-stack every stage needs."""
    return np.stack([load_for_model(s, height, width) for s in sources]).astype(np.float32, copy=False)
