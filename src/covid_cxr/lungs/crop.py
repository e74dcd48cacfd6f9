"""Lung-only classifier input (`covid-cxr train --lung-crop box|mask --lungs MODELS/lungs`):
crop each image to its lungs' bounding box with a margin (resized back to the input size), or
black out everything outside the (slightly dilated) lung fields. An image whose mask fails the
sanity check is passed through unchanged rather than cropped to nonsense.

Training applies it to each batch (`batch_transform`); a classifier bundle trained so carries its
lung model and mode, and every reader applies the same crop (`covid_cxr.bundle.Bundle.prepare`).
Numpy + ONNX Runtime only: the server runs it."""

from __future__ import annotations

import numpy as np

from covid_cxr.core.lung_config import CROP_DILATE as DILATE
from covid_cxr.core.lung_config import CROP_MARGIN as MARGIN
from covid_cxr.bundle.reader import load_embedded_lungs
from covid_cxr.lungs.segment import LungSegmenter, sanity_check

MODES = ("none", "box", "mask")


def crop_box(pixels: np.ndarray, mask: np.ndarray, margin: float = MARGIN) -> np.ndarray:
    from covid_cxr.data.decode import resize

    rows, cols = np.nonzero(mask)
    h, w = mask.shape
    dr, dc = margin * (rows.max() - rows.min() + 1), margin * (cols.max() - cols.min() + 1)
    r0, r1 = int(max(0, rows.min() - dr)), int(min(h, rows.max() + 1 + dr))
    c0, c1 = int(max(0, cols.min() - dc)), int(min(w, cols.max() + 1 + dc))
    return np.clip(resize(pixels[r0:r1, c0:c1], h, w), 0, 1)


def mask_outside(pixels: np.ndarray, mask: np.ndarray, dilate: float = DILATE) -> np.ndarray:
    from scipy import ndimage

    grown = ndimage.binary_dilation(mask, iterations=max(1, int(dilate * mask.shape[0])))
    return np.where(grown, pixels, 0.0).astype(np.float32)


def lung_only(images: np.ndarray, segmenter, mode: str, margin: float = MARGIN, dilate: float = DILATE) -> np.ndarray:
    """N x H x W float [0, 1] -> the same, lung-only by `mode` ('none' returns the input)."""
    if mode == "none":
        return images
    if mode not in MODES:
        raise ValueError(f"lung crop mode {mode!r}: choose from {', '.join(MODES)}")
    masks = segmenter.masks(images)
    out = []
    for px, m in zip(images, masks):
        if not sanity_check(m).ok:
            out.append(px)
        else:
            out.append(crop_box(px, m, margin) if mode == "box" else mask_outside(px, m, dilate))
    return np.stack(out).astype(np.float32)


def batch_transform(mode: str, lungs: str | None):
    """The function the feature extractor applies to each loaded batch (None: no lung crop)."""
    if mode == "none":
        return None
    from covid_cxr.lungs.segment import segmenter_for

    seg = segmenter_for(lungs)
    return lambda batch: lung_only(batch, seg, mode)


def bundle_segmenter(bundle, threads: int = 0, spinning: bool = False):
    """The LungSegmenter of a --lung-crop bundle's own lung model (`lungs/`), opened once and kept
    on the bundle; None for a bundle without lung_crop. The server opens it first with its
    thread settings."""
    if bundle.metadata.lung_crop is None:
        return None
    if "lungs" not in bundle.step_state:
        bundle.step_state["lungs"] = LungSegmenter(load_embedded_lungs(bundle), threads, spinning)
    return bundle.step_state["lungs"]


def crop_step(bundle, images: np.ndarray) -> np.ndarray:
    """The `lung_crop` preparation step (registered in pyproject.toml): the crop metadata records."""
    crop = bundle.metadata.lung_crop
    return lung_only(images, bundle_segmenter(bundle), crop.mode, crop.margin, crop.dilate)
