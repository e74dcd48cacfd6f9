"""A torch module as an ONNX graph: one exporter for the bundle's classifier, the feature
extractor's trunk and the lung model, so every graph is made the same way."""

from __future__ import annotations

import warnings
from pathlib import Path

OPSET = 18


def export_graph(module, example, path: Path, inputs: list[str], outputs: list[str]) -> None:
    """torch module -> ONNX file, batch dimension dynamic on every tensor. The TorchScript exporter:
    ~10x faster than dynamo=True here (1 s vs 10-35 s) with the same graph semantics; callers check
    parity with PyTorch. Used for bundles and for the feature extractor's backbone."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes={n: {0: "batch"} for n in [*inputs, *outputs]},
                          opset_version=OPSET, dynamo=False, verbose=False)
