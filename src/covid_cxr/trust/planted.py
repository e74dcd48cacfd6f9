"""A planted shortcut, to prove the audit can catch one: copy a labelled folder with a small bright
square pasted into one corner of every image of one class (the others symlinked, unchanged).
A model trained on the copy can score by the marker alone; `covid-cxr audit` must flag it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

MARKER_SIDE = 0.06  # of the shorter image side
MARKER_INSET = 0.03


def paste_marker(img: Image.Image) -> Image.Image:
    """The top-left corner marker: a white square (max value of the image's mode)."""
    arr = np.array(img)
    h, w = arr.shape[:2]
    side, inset = max(2, round(MARKER_SIDE * min(h, w))), round(MARKER_INSET * min(h, w))
    arr[inset:inset + side, inset:inset + side] = np.iinfo(arr.dtype).max if arr.dtype.kind in "ui" else 1.0
    return Image.fromarray(arr, mode=img.mode if img.mode != "I;16" else None)


def plant(src: Path, dst: Path, marked_class: str | None = "COVID-19", files: dict[str, list[str]] | None = None) -> Path:
    """Copy `src`'s class folders to `dst` (only `files[class_folder]` when given): images of
    `marked_class` get the marker (written as PNG), the rest are symlinks to the originals
    (all of them when `marked_class` is None: the same images without the marker)."""
    from covid_cxr.data.layouts import discover, normalise_class

    disc = discover(src)
    for f in disc.files:
        folder = f.path.parent.name
        if files is not None and f.path.name not in files.get(folder, ()):
            continue
        out = Path(dst) / f.relpath
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists() or out.is_symlink():
            continue
        if marked_class is not None and normalise_class(f.label) == normalise_class(marked_class):
            with Image.open(f.path) as im:
                paste_marker(im if im.mode in ("L", "RGB", "I;16") else im.convert("L")).save(out.with_suffix(".png"))
        else:
            os.symlink(f.path, out)
    return Path(dst)
