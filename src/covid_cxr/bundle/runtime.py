"""OpenVINO as a second runtime for a bundle's model.onnx (torch-free; the `openvino` extra).

`open_openvino(...)` returns an object that answers like an ONNX Runtime session (`run`,
`get_inputs`, `get_outputs`), so the reader, the server's batcher and `run_classifier` take it
unchanged. A lower precision is a variant of the bundle: `check_variant` refuses one that
`covid-cxr bundle precision` has not measured and accepted (metadata.json `precision_variants`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covid_cxr.bundle.schema import OOD_OUTPUTS, BundleMetadata, PrecisionVariant
from covid_cxr.core.errors import UserError
from covid_cxr.core.precision import (
    MAX_CHANGED_GATE,
    MAX_CHANGED_PREDICTIONS,
    PRECISIONS,
    RUNTIMES,
    VARIANTS,
)

OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "bf16-split": "bf16", "int8": "f32"}


class RuntimeRefused(UserError):
    """A runtime or precision this bundle may not be served with (not installed, not measured, or
    measured and refused); the message says what was measured and the command that measures."""


def measure_command(meta: BundleMetadata, precision: str) -> str:
    return f"covid-cxr bundle precision MODELS/{meta.name} --precision {precision} [--data DIR]"


def check_choice(runtime: str, precision: str) -> None:
    """Known names, and lower precision only on OpenVINO (ONNX Runtime serves fp32)."""
    if runtime not in RUNTIMES:
        raise RuntimeRefused(f"runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    if precision not in PRECISIONS:
        raise RuntimeRefused(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if runtime == "onnxruntime" and precision != "fp32":
        raise RuntimeRefused(f"precision {precision} runs on OpenVINO only: add --runtime openvino")


def check_variant(meta: BundleMetadata, precision: str) -> PrecisionVariant | None:
    """The recorded, accepted measurement of `precision` (None for fp32, which needs none);
    RuntimeRefused, with the numbers and the command, for one never measured or refused."""
    if precision not in VARIANTS:
        return None
    found = (meta.precision_variants or {}).get(precision)
    where = f"{meta.name} v{meta.version}"
    if found is None:
        raise RuntimeRefused(f"{where}: precision {precision} was never measured against this bundle's fp32 "
                             f"answers; measure it with `{measure_command(meta, precision)}` (it publishes a new "
                             f"version that records the decision)")
    if not found.accepted:
        raise RuntimeRefused(f"{where}: precision {precision} was refused when measured: {found.summary()} "
                             f"(the rule: <= {MAX_CHANGED_PREDICTIONS:.1%} of predictions and <= "
                             f"{MAX_CHANGED_GATE:.1%} of gate verdicts changed); serve it in fp32")
    return found


def openvino_core():
    """openvino.Core(), or RuntimeRefused naming the extra when OpenVINO is not installed."""
    try:
        import openvino as ov
    except ImportError:
        raise RuntimeRefused("the OpenVINO runtime is not installed: pip install 'covid-cxr[openvino]' "
                             "(or serve with the default --runtime onnxruntime)") from None
    return ov.Core()


@dataclass(frozen=True)
class _Tensor:
    """What the reader's tensor check reads of an ONNX Runtime NodeArg: name, shape, type."""

    name: str
    shape: list
    type: str = "tensor(float)"


def _tensor(port) -> _Tensor:
    dims = [d.get_length() if d.is_static else -1 for d in port.get_partial_shape()]
    name = port.get_any_name()
    ok = port.get_element_type().get_type_name() in ("f32", "boolean") or name in OOD_OUTPUTS
    return _Tensor(name, dims, "tensor(float)" if ok else str(port.get_element_type()))


CONVOLUTIONS = ("Convolution", "GroupConvolution")


def _tail_ops(model, bf16_convs: int | None = None) -> set:
    """The ops after the convolutions: everything that is not a convolution or feeds one (the last
    block's activation, pooling, head, softmax, the gate's statistics and arithmetic).
    `bf16_convs`: only the first that many convolutions (in graph order) and what feeds them count
    as the trunk; the later ones join the tail (how deep bf16 may go, measured by bench_precision)."""
    stack = [op for op in model.get_ordered_ops() if op.get_type_name() in CONVOLUTIONS][:bf16_convs]
    trunk = set()
    while stack:
        op = stack.pop()
        if op not in trunk:
            trunk.add(op)
            stack.extend(i.get_source_output().get_node() for i in op.inputs())
    return {op for op in model.get_ordered_ops()
            if op not in trunk and op.get_type_name() not in ("Parameter", "Constant")}


def split_model(model, bf16_convs: int | None = None):
    """(backbone, tail): two models cut where the spatial part ends (or after `bf16_convs`
    convolutions). The backbone answers the tensors the tail reads (activations of the last block
    and the gate's stages); the tail takes them as inputs and answers the bundle's outputs.
    Modifies `model`."""
    import openvino as ov
    from openvino import opset13 as ops

    tail = _tail_ops(model, bf16_convs)
    cut: dict = {}  # backbone output -> the tail's parameter standing for it
    for op in list(tail):
        for port in op.inputs():
            src = port.get_source_output()
            if src.get_node() in tail or src.get_node().get_type_name() == "Constant":
                continue
            key = (src.get_node().get_friendly_name(), src.get_index())
            if key not in cut:
                cut[key] = (src, ops.parameter(src.get_partial_shape(), src.get_element_type(), name=f"cut{len(cut)}"))
            port.replace_source_output(cut[key][1].output(0))
    if not cut:
        raise RuntimeRefused("this model has no spatial part to cut off (no bf16-split)")
    backbone = ov.Model([ops.result(src) for src, _ in cut.values()], list(model.get_parameters()), "backbone")
    head = ov.Model(list(model.get_results()), [p for _, p in cut.values()], "tail")
    return backbone, head


class OpenVinoSession:
    """Compiled OpenVINO model(s) answering like an ONNX Runtime session: one, or the backbone and
    the tail of a split model run one after the other (`compile_openvino`). One infer request per
    thread (a request is not thread-safe; the server may run several inference workers).
    `gate_threshold`: the variant's refitted threshold replaces the graph's in_distribution."""

    def __init__(self, compiled: tuple, gate_threshold: float | None = None):
        self.compiled = compiled
        self.gate_threshold = gate_threshold
        self._local = threading.local()
        self._inputs = [_tensor(p) for p in compiled[0].inputs]
        self._outputs = [_tensor(p) for p in compiled[-1].outputs]

    def get_inputs(self) -> list[_Tensor]:
        return self._inputs

    def get_outputs(self) -> list[_Tensor]:
        return self._outputs

    def _requests(self) -> list:
        found = getattr(self._local, "requests", None)
        if found is None:
            found = self._local.requests = [c.create_infer_request() for c in self.compiled]
        return found

    def run(self, names, feeds: dict) -> list[np.ndarray]:
        requests = self._requests()
        requests[0].infer({k: np.ascontiguousarray(v, np.float32) for k, v in feeds.items()})
        for prev, req in zip(requests, requests[1:]):  # the tail reads the backbone's outputs in order
            req.infer({i: prev.get_output_tensor(i).data for i in range(len(prev.model_outputs))})
        last = requests[-1]
        names = list(names or [t.name for t in self._outputs])
        got = {n: np.array(last.get_tensor(n).data, np.float32) for n in {*names, *self._gate_names(names)}}
        if self.gate_threshold is not None and OOD_OUTPUTS[1] in got:
            got[OOD_OUTPUTS[1]] = (got[OOD_OUTPUTS[0]] <= self.gate_threshold).astype(np.float32)
        return [got[n] for n in names]

    def _gate_names(self, names: list[str]) -> tuple[str, ...]:
        return (OOD_OUTPUTS[0],) if self.gate_threshold is not None and OOD_OUTPUTS[1] in names else ()


def compile_openvino(model_path: Path, precision: str, threads: int = 0, bf16_convs: int | None = None) -> tuple:
    """model.onnx (or a variant's IR) compiled for the CPU at `precision`: fp32 pinned explicitly
    (OpenVINO would pick bf16 on its own on CPUs with AMX), one stream, `threads` (0: all cores).
    bf16-split: two models, the backbone in bf16 and the tail (head, gate) in fp32."""
    core = openvino_core()
    model = core.read_model(str(model_path))
    parts = split_model(model, bf16_convs) if precision == "bf16-split" else (model,)
    hints = ("bf16", "f32") if precision == "bf16-split" else (OV_PRECISION[precision],)
    try:
        return tuple(core.compile_model(m, "CPU", _config(h, threads)) for m, h in zip(parts, hints))
    except RuntimeError as exc:  # e.g. bf16 on a CPU without AVX-512 BF16 / AMX
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise RuntimeRefused(f"{model_path}: OpenVINO cannot compile it at {precision} on this CPU: {first}") from None


def _config(hint: str, threads: int) -> dict:
    config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    return config


def open_openvino(path: Path, meta: BundleMetadata, precision: str, threads: int = 0,
                  variant: PrecisionVariant | None = None) -> OpenVinoSession:
    """An OpenVINO session for the bundle at `path`: model.onnx, or the variant's own file (int8);
    the variant's refitted gate threshold applied. Checking the variant is the caller's step."""
    file = path / (variant.file if variant is not None and variant.file else meta.onnx.file)
    if not file.is_file():
        raise RuntimeRefused(f"{file}: missing (metadata.json's precision_variants.{precision} names it)")
    gate = variant.gate_threshold if variant is not None else None
    return OpenVinoSession(compile_openvino(file, precision, threads), gate)
