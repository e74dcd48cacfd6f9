"""Grad-CAM explanations (through the grad-cam package) and overlays.

Names are loaded on first use, so importing this package (the CLI does, the ONNX-only server may)
does not pull in torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {name: "covid_cxr.explain.gradcam" for name in (
    "METHODS", "Explainer", "Explanation", "explain_array", "explainer_for_bundle", "overlay",
    "overlay_for_bundle", "png_bytes", "jet")}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
