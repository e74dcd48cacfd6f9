"""Read a folder of images once for a site check: the model's input pixels and the cheap image
statistics a site is compared on (torch-free: numpy, PIL, pydicom).

Why these statistics: the acquisition shifts a new hospital brings (other detectors, other
processing, letterboxing, burnt-in text, compression, down-sampled exports) move brightness,
contrast, sharpness, the border or the file's size before they move the model's answers, and they
cost nothing beside the decode the model needs anyway."""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from covid_cxr.data.decode import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, DecodeError, decode_gray, read_regular, resize

SCALARS = ("side", "aspect", "brightness", "contrast", "sharpness", "border")
HIST_BINS = 16
BORDER = 0.08  # share of each side counted as the image's border
DICOM_TAGS = ("Modality", "Manufacturer", "ViewPosition")


@dataclass
class ImageBatch:
    """Each image's statistics, gathered while its pixels go to the model."""

    paths: list[Path] = field(default_factory=list)  # the files read (skipped ones left out)
    stats: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in SCALARS})
    histograms: list[np.ndarray] = field(default_factory=list)
    bit_depth: Counter = field(default_factory=Counter)
    dicom: dict[str, Counter] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def image_files(folder: Path) -> list[Path]:
    """Every image file under `folder` (class folders or none), sorted; hidden entries left out."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def pixel_stats(x: np.ndarray) -> dict[str, float]:
    """Brightness, contrast, sharpness and border brightness of one H x W image in [0, 1]."""
    b = max(1, int(round(BORDER * min(x.shape))))
    frame = np.concatenate([x[:b].ravel(), x[-b:].ravel(), x[b:-b, :b].ravel(), x[b:-b, -b:].ravel()])
    sharp = (np.abs(np.diff(x, axis=0)).mean() + np.abs(np.diff(x, axis=1)).mean()) / 2
    return {"brightness": float(x.mean()), "contrast": float(x.std()), "sharpness": float(sharp),
            "border": float(frame.mean())}


def _header(data: bytes, fmt: str) -> tuple[int, dict[str, str]]:
    """Bits per sample, and (DICOM) the acquisition tags, from the file's header."""
    if fmt == "DICOM":
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        tags = {t: str(getattr(ds, t)) for t in DICOM_TAGS if str(getattr(ds, t, "") or "")}
        age = str(getattr(ds, "PatientAge", "") or "")
        if age[:3].isdigit() and age.endswith("Y"):
            tags["PatientAge"] = f"{int(age[:3]) // 10 * 10}s"  # decades only: no patient's own age
        return int(getattr(ds, "BitsStored", 0) or 0), tags
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        bits = {"1": 1, "I;16": 16, "I;16B": 16, "I": 32, "F": 32}.get(img.mode, 8)
    return bits, {}


def read_images(paths: list[Path], height: int, width: int, batch: ImageBatch | None = None,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[ImageBatch, np.ndarray]:
    """Decode every file once: its statistics are added to `batch` (a new one by default; a
    caller reading a large folder in chunks passes the same one), its pixels returned (N x H x W).
    Unreadable files are listed in `batch.skipped`, not fatal."""
    batch = batch or ImageBatch()
    pixels = []
    for p in paths:
        try:
            data = read_regular(p)
            dec = decode_gray(data, max_pixels, (height, width))
            bits, tags = _header(data, dec.format)
        except (DecodeError, OSError, ValueError) as exc:
            batch.skipped.append((str(p), str(exc)))
            continue
        x = resize(dec.pixels, height, width)
        pixels.append(x)
        batch.paths.append(p)
        for k, v in {"side": float(min(dec.width, dec.height)), "aspect": dec.width / dec.height,
                     **pixel_stats(x)}.items():
            batch.stats[k].append(v)
        batch.histograms.append(np.histogram(x, HIST_BINS, (0.0, 1.0))[0] / x.size)
        batch.bit_depth[str(bits)] += 1
        for t, v in tags.items():
            batch.dicom.setdefault(t, Counter())[v] += 1
    out = np.stack(pixels).astype(np.float32, copy=False) if pixels else np.zeros((0, height, width), np.float32)
    return batch, out
