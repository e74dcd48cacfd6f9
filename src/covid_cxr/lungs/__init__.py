"""Lung fields: a U-Net lung segmenter (train, evaluate, segment) and what it makes possible:
where Grad-CAM looks by lung zone, lung-only classifier input, a segmentation sanity check as one
more out-of-distribution signal.

    LungSegmenter.from_bundle(MODELS/lungs).masks(images_float01_NxHxW) -> bool N x H x W

This package is the runtime side (numpy + ONNX Runtime only): segment, crop, zones. Training the
U-Net lives in train/lungs.py (model: models/lung_unet.py, data: data/lung_masks.py, Dice/IoU:
evaluate/lungs.py), so the server can read a lung model without torch. Names load on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LungSegmenter": "covid_cxr.lungs.segment",
    "Sanity": "covid_cxr.lungs.segment",
    "sanity_check": "covid_cxr.lungs.segment",
    "lung_fields": "covid_cxr.lungs.segment",
    "CamZones": "covid_cxr.lungs.zones",
    "cam_zones": "covid_cxr.lungs.zones",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
