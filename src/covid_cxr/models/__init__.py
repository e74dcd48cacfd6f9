"""Architectures and weight sources behind one face: `create_model(arch, weights=...)`.

The registry is torch-free; the torch parts load on first use, so `covid_cxr.core.architectures` can
be read by the ONNX-only server and the bundle schema without importing torch."""

from covid_cxr.core.architectures import REGISTRY, ArchSpec, get_spec, list_archs

_LAZY = {"Classifier": "classifier", "Head": "classifier", "ProbabilityModel": "classifier",
         "create_model": "classifier", "classifier_from_metadata": "classifier",
         "WeightsUnavailable": "weights", "read_state_dict": "weights"}

__all__ = ["REGISTRY", "ArchSpec", "get_spec", "list_archs", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"covid_cxr.models.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'covid_cxr.models' has no attribute {name!r}")
