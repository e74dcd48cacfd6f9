"""`covid-cxr export --format triton --models MODELS --out REPO` (registered on the main Typer app)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

FORMATS = ("triton",)


def export(models: Annotated[Path, typer.Option("--models", help="Model repository (MODELS).")],
           out: Annotated[Path, typer.Option("--out", help="Triton model repository to write (REPO).")],
           format: Annotated[str, typer.Option("--format", help="triton: a Triton Inference Server "
                                               "model repository")] = "triton",
           model: Annotated[Optional[list[str]], typer.Option("--model", help="Only this model (repeatable).")] = None,
           all_versions: Annotated[bool, typer.Option("--all-versions", help="Every version (Triton serves all); "
                                                      "default: the newest")] = False,
           max_batch_size: Annotated[int, typer.Option(min=1, help="Triton's max_batch_size "
                                                       "(dynamic batching up to it)")] = 64,
           backend: Annotated[str, typer.Option(help="onnxruntime: Triton's onnxruntime backend (GPU Triton) | "
                                                "python: model.py runs model.onnx on ONNX Runtime (a Triton "
                                                "with the python backend only)")] = "onnxruntime"):
    """Write REPO/<name>/config.pbtxt, labels.txt and <version>/model.onnx (and model.py with
    --backend python) for Triton or KServe.
    The exported models take FP32 [N, H, W, 1] tensors; image files (BYTES) are our server's path."""
    from rich.console import Console

    from covid_cxr.cli.common import fail
    from covid_cxr.export.triton import export_triton

    if format not in FORMATS:
        fail(f"--format {format!r}: one of {', '.join(FORMATS)}")
    written = export_triton(models, out, model, all_versions, max_batch_size, backend)
    for d in written:
        vs = sorted(p.name for p in d.iterdir() if p.is_dir())
        Console().print(f"{d}: config.pbtxt ({backend} backend), labels.txt, versions {', '.join(vs)}")


def register(app: typer.Typer) -> None:
    app.command("export")(export)
