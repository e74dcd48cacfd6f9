"""Dataset folders -> validated manifest -> balanced, group-aware splits -> tensors."""

from covid_cxr.data.decode import DecodeError, decode_gray, load_for_model
from covid_cxr.data.layouts import CLASS_NAMES, discover, normalise_class
from covid_cxr.data.manifest import Manifest, Record, build_manifest
from covid_cxr.data.prepare import BALANCE_CHOICES, PreparedData, prepare

__all__ = ["BALANCE_CHOICES", "CLASS_NAMES", "DecodeError", "Manifest", "PreparedData", "Record",
           "build_manifest", "decode_gray", "discover", "load_for_model", "normalise_class", "prepare"]
