"""Tensor data types as the Open Inference Protocol (and Triton's model config, with `TYPE_`) name them.

One table, read by the OIP router (`/v2/...`) and by the Triton exporter, so both describe a bundle's
ONNX tensors (`metadata.onnx.inputs/outputs`) in the same words.
"""

from __future__ import annotations

import numpy as np

OIP_DATATYPE = {"bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
                "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
                "float16": "FP16", "float32": "FP32", "float64": "FP64"}
NUMPY_OF = {v: np.dtype(k) for k, v in OIP_DATATYPE.items()}


def oip_datatype(dtype) -> str:
    """numpy dtype (or its name, as metadata.json writes it) -> 'FP32', 'BOOL', ..."""
    name = np.dtype(dtype).name
    if name not in OIP_DATATYPE:
        raise ValueError(f"no Open Inference Protocol datatype for {name}")
    return OIP_DATATYPE[name]


def triton_type(dtype) -> str:
    """numpy dtype (or its name) -> Triton model config's data_type ('TYPE_FP32', ...)."""
    return "TYPE_" + oip_datatype(dtype)
