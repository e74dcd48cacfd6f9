"""Triton's python backend model for an exported bundle: model.onnx on ONNX Runtime (CPU).

`covid-cxr export --format triton --backend python` copies this file as REPO/<name>/<version>/model.py
beside model.onnx. It runs inside Triton's python backend stub, where `triton_python_backend_utils`
exists, and needs numpy and onnxruntime there, nothing from covid-cxr. For a Triton without the
onnxruntime backend (the CPU-only server of the nvidia-pytriton wheel); GPU Triton takes the
onnxruntime_onnx variant. The requests of one dynamic batch go through one ONNX Runtime call.

Tensors cross the stub by DLPack, not `Tensor.as_numpy()` / `Tensor(name, array)`: stubs built
against numpy 1 read a dtype's item size from numpy 1's struct layout, which numpy 2 moved, so under
numpy 2 inputs arrive with zero strides (every pixel = the first) and outputs with zero bytes.
DLPack describes the memory in its own stable struct, right under either numpy.
"""

import ctypes
import json
import os

import numpy as np

_USED = b"used_dltensor"  # the name DLPack consumers give a capsule they took (kept alive: ctypes points at it)


class _Capsule:
    """A Triton tensor as numpy's from_dlpack wants it (an object with __dlpack__)."""

    def __init__(self, tensor):
        self.tensor = tensor

    def __dlpack__(self, **_):
        return self.tensor.to_dlpack()

    def __dlpack_device__(self):
        return (1, 0)  # kDLCPU


def _mark_used(capsule) -> None:
    """Some stubs rename a consumed capsule 'used_dlpack'; numpy's capsule destructor knows only the
    standard 'used_dltensor' and would report an error (and not free) for every output."""
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    if get_name(capsule) != b"dltensor":
        set_name = ctypes.pythonapi.PyCapsule_SetName
        set_name.restype, set_name.argtypes = ctypes.c_int, [ctypes.py_object, ctypes.c_char_p]
        set_name(capsule, _USED)


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(params.get("intra_op_threads", "0") or 0)
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    def _output(self, name, array):
        import triton_python_backend_utils as pb_utils

        capsule = np.ascontiguousarray(array).copy().__dlpack__()
        tensor = pb_utils.Tensor.from_dlpack(name, capsule)
        _mark_used(capsule)
        return tensor

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        feeds = {name: [np.from_dlpack(_Capsule(pb_utils.get_input_tensor_by_name(r, name))).astype(np.float32)
                        for r in requests] for name in self.inputs}
        sizes = [len(x) for x in feeds[self.inputs[0]]]
        results = self.session.run(self.outputs, {k: np.concatenate(v) for k, v in feeds.items()})
        edges = np.cumsum(sizes)[:-1]
        parts = [np.split(np.asarray(r), edges) for r in results]
        return [pb_utils.InferenceResponse(output_tensors=[self._output(name, part[i])
                                                           for name, part in zip(self.outputs, parts)])
                for i in range(len(requests))]
