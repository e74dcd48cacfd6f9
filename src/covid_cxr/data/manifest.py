"""The manifest: one row per file found, valid or not, with the facts every later stage needs.

Scanning decodes each file once: it proves the file is readable, records its hashes (sha256 for
exact duplicates, a perceptual hash for near duplicates) and its pixel sums (so normalisation
statistics of any split come without decoding again).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image

from covid_cxr.data.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_gray, read_regular
from covid_cxr.data.layouts import CLASS_NAMES, Discovery, discover, normalise_class


@dataclass
class Record:
    path: str  # relative to the dataset root
    label: str
    sha256: str = ""
    phash: str = ""  # 64-bit perceptual hash, hex
    size_bytes: int = 0
    width: int = 0
    height: int = 0
    format: str = ""
    status: str = "ok"  # ok | skipped | duplicate
    reason: str = ""
    group: int = -1  # duplicate group id (exact or near); -1 until dedupe runs
    pixel_mean: float = 0.0  # mean of the [0, 1] grayscale pixels
    pixel_sq_mean: float = 0.0  # mean of their squares
    source: str = ""  # which --data folder it came from (several datasets); "" for one


@dataclass
class Manifest:
    root: Path
    layout: str
    classes: tuple[str, ...]
    records: list[Record]
    excluded_classes: dict[str, int]
    dedupe: dict[str, int] = field(default_factory=dict)  # counts from dedupe.mark_duplicates

    @property
    def ok(self) -> list[Record]:
        return [r for r in self.records if r.status == "ok"]

    def digest(self) -> str:
        """Content digest of the usable images and their labels: identifies a training set."""
        h = hashlib.sha256()
        for r in sorted(self.ok, key=lambda r: r.sha256):
            h.update(f"{r.sha256}:{r.label}\n".encode())
        return h.hexdigest()

    def write_csv(self, path: str | Path) -> None:
        from covid_cxr.core.files import atomic_write_csv

        names = [f.name for f in fields(Record)]
        atomic_write_csv(path, names, ([getattr(r, n) for n in names] for r in self.records))


def scan_file(path: Path, relpath: str, label: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Record:
    rec = Record(path=relpath, label=label)
    try:
        data = read_regular(path)  # a FIFO or device is skipped with its reason, never read
    except DecodeError as exc:
        rec.status, rec.reason = "skipped", str(exc)
        return rec
    rec.size_bytes = len(data)
    rec.sha256 = hashlib.sha256(data).hexdigest()
    try:
        dec = decode_gray(data, max_pixels)
    except DecodeError as exc:
        rec.status, rec.reason = "skipped", str(exc)
        return rec
    px = dec.pixels
    rec.width, rec.height, rec.format = dec.width, dec.height, dec.format
    rec.pixel_mean = float(px.mean())
    rec.pixel_sq_mean = float(np.square(px, dtype=np.float64).mean())
    rec.phash = str(imagehash.phash(Image.fromarray(np.round(px * 255).astype(np.uint8), mode="L")))
    return rec


def build_manifest(root: str | Path, classes=None, max_pixels: int = DEFAULT_MAX_PIXELS,
                   near_threshold: int = 4, progress: bool = True, allow_missing: bool = False) -> Manifest:
    """Discover, decode and hash every file, then mark duplicates (see `dedupe.mark_duplicates`).
    `allow_missing`: a folder may lack some of `classes` (evaluation of an external set)."""
    from covid_cxr.data.dedupe import mark_duplicates
    from covid_cxr.core.progress import progress_iter

    disc: Discovery = discover(root, classes, allow_missing)
    recs = [scan_file(f.path, f.relpath, f.label, max_pixels)
            for f in progress_iter(disc.files, "scanning images", enabled=progress)]
    classes_out = tuple(normalise_class(c) for c in (classes or CLASS_NAMES))
    dedupe = mark_duplicates(recs, near_threshold=near_threshold)
    return Manifest(disc.root, disc.layout, classes_out, recs, disc.excluded_classes, dedupe)
