"""`covid-cxr bundle check MODELS/<name>[/<version>]` (registered on the main Typer app)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from covid_cxr.cli.common import config_option
from covid_cxr.core.config import TrainConfig
from covid_cxr.core.precision import VARIANTS

bundle_app = typer.Typer(no_args_is_help=True, help="Inspect model bundles.")


@bundle_app.command("check")
def check(path: Annotated[Path, typer.Argument(help="MODELS/<name> (newest version) or MODELS/<name>/<version>")]):
    """Schema valid, files present, ONNX inputs/outputs as the metadata says, one image runs.
    Exit 0 and `ok: PATH` (then what it holds, wrapped to the terminal) on success; exit 2 and one
    line naming the file and the fault otherwise."""
    from rich.console import Console

    from covid_cxr.cli.common import open_bundle

    b = open_bundle(path)
    fmt = f"format {b.format_on_disk}" + (" (read as 2)" if b.format_on_disk == 1 else "")
    con = Console(highlight=False)
    con.print(f"ok: {b.path}", soft_wrap=True)  # one unbroken line a script can read
    con.print(f"    {b.name} v{b.version}, {fmt}, {b.metadata.task}, {b.metadata.architecture.name}, "
              f"input {b.input_hw[0]}x{b.input_hw[1]}, classes {', '.join(b.classes)}")
    if b.metadata.lung_crop is not None:
        crop = b.metadata.lung_crop
        con.print(f"    lung-only input: {crop.mode} crop by its own lung model ({crop.folder}/, "
                  f"from {crop.lungs_from})")


@bundle_app.command("add-cam")
def add_cam(path: Annotated[Path, typer.Argument(help="MODELS/<name> (newest version) or MODELS/<name>/<version>")]):
    """Publish the next version of a bundle written before Grad-CAM moved into the graph, with
    cam.onnx added (checked against pytorch-grad-cam): the server then explains it without torch."""
    from rich.console import Console

    from covid_cxr.publish.writer import add_cam as add
    from covid_cxr.cli.common import open_bundle

    src = open_bundle(path)
    b = add(src.path)
    Console().print(f"bundle: {b.path} ({b.name} v{b.version}: v{src.version} + cam.onnx, max |d| vs "
                    f"pytorch-grad-cam {b.metadata.cam.parity_max_abs_diff:.1e})")


@bundle_app.command("precision")
def precision(path: Annotated[Path, typer.Argument(help="MODELS/<name> (newest version) or MODELS/<name>/<version>")],
              precision: Annotated[str, typer.Option("--precision", help="the variant to measure: "
                                                     f"{' | '.join(VARIANTS)} (OpenVINO)")] = "bf16",
              data: Annotated[Optional[Path], typer.Option("--data", help="the bundle's training data where it is "
                                                           "now (default: the folder metadata.json names)")] = None,
              threads: Annotated[int, typer.Option(help="OpenVINO threads (0: every core)", min=0)] = 0):
    """Measure a lower precision against the bundle's own fp32 answers on its validation split and
    publish the next version recording the decision: accepted only if <= 0.5 % of predictions and
    <= 0.5 % of gate verdicts change (the gate's threshold refitted where that helps)."""
    from rich.console import Console

    from covid_cxr.cli.common import open_bundle
    from covid_cxr.publish.precision import add_precision

    src = open_bundle(path)
    b = add_precision(src.path, precision, data, threads=threads)
    v = b.metadata.precision_variants[precision]
    verdict = "accepted" if v.accepted else "refused"
    Console().print(f"{precision} {verdict}: {v.summary()}; max |dp| {v.max_abs_diff:.1e}"
                    + ("" if v.gate_threshold is None else f"; gate threshold refitted to {v.gate_threshold:.4g}")
                    + f"\nbundle: {b.path} ({b.name} v{b.version}: v{src.version} + this decision)", soft_wrap=True)


@bundle_app.command("schema")
def schema():
    """Print the JSON Schema of metadata.json (format 2), as committed in docs/bundle.schema.json."""
    from covid_cxr.bundle.schema import json_schema

    typer.echo(json_schema(), nl=False)


def register(app: typer.Typer) -> None:
    app.add_typer(bundle_app, name="bundle")


def ensemble(members: Annotated[list[Path], typer.Argument(help="Member bundles MODELS/<name>\\[/<version>]")],
             out: Annotated[Path, typer.Option("--out", help="Model repository (MODELS).")],
             name: Annotated[str, typer.Option("--name", help="The ensemble's bundle name.")] = "ensemble",
             evaluate: Annotated[bool, typer.Option(help="Test metrics on the members' common test split.")] = True,
             target_recall: Annotated[Optional[str], typer.Option(help="Operating point CLASS=RECALL, fitted "
                                                                   "on the validation split.")] = None,
             target_confidence: Annotated[Optional[float], config_option(TrainConfig, "target_confidence")] = None,
             target_batch: Annotated[Optional[int], config_option(TrainConfig, "target_batch")] = None):
    """One bundle whose ONNX model averages its members' probabilities (served, evaluated, explained
    like any bundle)."""
    from rich.console import Console

    from covid_cxr.publish.ensemble import build_ensemble

    rule = {"confidence": target_confidence} if target_confidence is not None else {}  # else TrainConfig's default
    b = build_ensemble(members, out, name, evaluate, target_recall, batch=target_batch, **rule)
    m = b.metadata.test_metrics
    extra = f"; test accuracy {m.accuracy:.3f}, n={m.n}" if m else ""
    Console().print(f"bundle: {b.path} ({len(members)} members{extra})")


def register_ensemble(app: typer.Typer) -> None:
    app.command("ensemble")(ensemble)
