"""`covid-cxr bundle check`: everything that can be checked without running training code."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from covid_cxr.bundle.reader import Bundle, BundleError, load_bundle
from covid_cxr.bundle.schema import ONNX_INPUT, ONNX_MASK, ONNX_OUTPUT


def check_bundle(path: str | Path) -> Bundle:
    """Schema valid, files present, ONNX tensors as the metadata says, and one image through ONNX
    Runtime giving probabilities. Returns the bundle; raises BundleError naming the file otherwise."""
    bundle = load_bundle(path)
    session = bundle.session()  # opens model.onnx and compares its tensors with metadata.json
    h, w = bundle.input_hw
    x = np.full((1, h, w, 1), 0.5, np.float32)
    if bundle.metadata.task == "segmentation":
        out = session.run([ONNX_MASK], {ONNX_INPUT: x})[0]
        if not (out.shape == (1, h, w, 1) and np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1):
            raise BundleError(f"{bundle.onnx_path}: output is not a {h}x{w} probability mask: shape {out.shape}")
        return bundle
    out = session.run([ONNX_OUTPUT], {ONNX_INPUT: x})[0]
    if not (np.isfinite(out).all() and abs(float(out.sum()) - 1.0) < 1e-3):
        raise BundleError(f"{bundle.onnx_path}: output is not a probability vector: {out.tolist()}")
    return bundle
