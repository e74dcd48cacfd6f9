"""Architectures and weight sources behind one face: `create_model(arch, weights=...)`."""

from covid_cxr.models.classifier import Classifier, Head, ProbabilityModel, create_model
from covid_cxr.models.registry import REGISTRY, ArchSpec, get_spec, list_archs
from covid_cxr.models.weights import WeightsUnavailable, read_state_dict

__all__ = ["REGISTRY", "ArchSpec", "Classifier", "Head", "ProbabilityModel", "WeightsUnavailable",
           "create_model", "get_spec", "list_archs", "read_state_dict"]
