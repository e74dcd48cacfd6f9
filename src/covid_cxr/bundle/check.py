"""`covid-cxr bundle check`: everything that can be checked without running training code."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from covid_cxr.bundle.reader import Bundle, BundleError, load_bundle, load_embedded_lungs
from covid_cxr.bundle.schema import ONNX_INPUT, ONNX_MASK


def check_bundle(path: str | Path) -> Bundle:
    """Schema valid, files present, ONNX tensors as the metadata says, and one image through ONNX
    Runtime giving probabilities (or a mask); a --lung-crop classifier's own lung model too, and the
    image through the crop. Returns the bundle; raises BundleError naming the file otherwise."""
    bundle = load_bundle(path)
    if bundle.metadata.task == "segmentation":
        _check_mask_model(bundle)
        return bundle
    if bundle.metadata.lung_crop is not None:
        _check_embedded_lungs(bundle)
    h, w = bundle.input_hw
    out = bundle.predict(np.full((1, h, w), 0.5, np.float32))  # opens model.onnx, compares its tensors
    if not (np.isfinite(out).all() and abs(float(out.sum()) - 1.0) < 1e-3):
        raise BundleError(f"{bundle.onnx_path}: output is not a probability vector: {out.tolist()}")
    if bundle.has_cam:  # opens cam.onnx, compares its tensors with metadata.json, runs the image
        maps = bundle.cam_maps(np.full((1, h, w), 0.5, np.float32))
        if maps.shape != (1, len(bundle.classes), h, w):
            raise BundleError(f"{bundle.path / bundle.metadata.cam.file}: maps of shape {maps.shape}")
    return bundle


def _check_mask_model(bundle: Bundle) -> None:
    session = bundle.session()  # opens model.onnx and compares its tensors with metadata.json
    h, w = bundle.input_hw
    out = session.run([ONNX_MASK], {ONNX_INPUT: np.full((1, h, w, 1), 0.5, np.float32)})[0]
    if not (out.shape == (1, h, w, 1) and np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1):
        raise BundleError(f"{bundle.onnx_path}: output is not a {h}x{w} probability mask: shape {out.shape}")


def _check_embedded_lungs(bundle: Bundle) -> None:
    """The lung model a --lung-crop classifier carries: the very file it was written with (its
    sha256, checked on every load), working."""
    _check_mask_model(load_embedded_lungs(bundle))
