"""Lung fields: a U-Net lung segmenter (train, evaluate, segment) and what it makes possible:
where Grad-CAM looks by lung zone, lung-only classifier input, a segmentation sanity check as one
more out-of-distribution signal.

    LungSegmenter.from_bundle(MODELS/lungs).masks(images_float01_NxHxW) -> bool N x H x W

The reader side (segment, zones, config) needs numpy + ONNX Runtime only; training needs torch.
Names load on first use so importing this package stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LungConfig": "covid_cxr.core.lung_config",
    "LungSegmenter": "covid_cxr.lungs.segment",
    "Sanity": "covid_cxr.lungs.segment",
    "sanity_check": "covid_cxr.lungs.segment",
    "lung_fields": "covid_cxr.lungs.segment",
    "CamZones": "covid_cxr.lungs.zones",
    "cam_zones": "covid_cxr.lungs.zones",
    "train_lungs": "covid_cxr.lungs.train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
