"""The model bundle: a TensorFlow-Serving-style model repository, readable without training code.

    MODELS/<name>/<version>/  model.safetensors  model.onnx  metadata.json  report/

schema (the typed metadata.json), store (names, versions, atomic publishing), reader (numpy + ONNX
Runtime only), check (`covid-cxr bundle check`). The writer (torch: export and write) is imported on its own,
`covid_cxr.publish.writer`, by training code only.
"""

from covid_cxr.bundle.check import check_bundle
from covid_cxr.bundle.reader import Bundle, BundleError, load_bundle, open_checked_session, open_session, read_metadata
from covid_cxr.bundle.schema import FORMAT_VERSION, ONNX_INPUT, ONNX_OUTPUT, OOD_OUTPUTS, BundleMetadata
from covid_cxr.bundle.store import clean_stale, parse_version, valid_name, versions

__all__ = ["FORMAT_VERSION", "ONNX_INPUT", "ONNX_OUTPUT", "OOD_OUTPUTS", "Bundle", "BundleError", "BundleMetadata",
           "check_bundle", "clean_stale", "load_bundle", "open_checked_session", "open_session", "parse_version",
           "read_metadata", "valid_name", "versions"]

