"""Other engines' formats: a Triton Inference Server model repository (numpy and the bundle reader only)."""

from covid_cxr.export.tensors import OIP_DATATYPE, oip_datatype
from covid_cxr.export.triton import export_triton, model_config, to_pbtxt

__all__ = ["OIP_DATATYPE", "export_triton", "model_config", "oip_datatype", "to_pbtxt"]
