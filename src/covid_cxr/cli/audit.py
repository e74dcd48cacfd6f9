"""`covid-cxr audit` (registered on the main Typer app)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from covid_cxr.cli.common import JsonOpt


def audit(model: Annotated[Path, typer.Option("--model", help="MODELS/<name>\\[/<version>]")],
          data: Annotated[Path, typer.Option("--data", help="Labelled dataset folder (any supported layout).")],
          out: Annotated[Optional[Path], typer.Option(help="Report folder (audit.md, audit.json, plots).")] = None,
          json_path: JsonOpt = None,
          lungs: Annotated[Optional[Path], typer.Option(help="Lung segmentation bundle (covid-cxr lungs train); default: a fixed central region.")] = None,
          per_class: Annotated[int, typer.Option(help="Images per class in the sample.", min=2)] = 150,
          cam_per_class: Annotated[int, typer.Option(help="Images per class for Grad-CAM (0: skip).", min=0)] = 12,
          seed: Annotated[int, typer.Option(help="Seed of the probes' random picks.")] = 0):
    """Shortcut audit: occlusion of the lung fields, acquisition probe, Grad-CAM mass in the lungs."""
    from rich.console import Console

    from covid_cxr.cli.common import open_bundle
    from covid_cxr.trust.audit import run_audit
    from covid_cxr.cli.common import write_json

    b = open_bundle(model)
    out = out or Path("runs/audit") / f"{b.name}-v{b.version}-{data.resolve().name}"
    r = run_audit(b, data, out, per_class, cam_per_class, seed, lungs)
    write_json(json_path, r)
    con = Console()
    con.print(("[bold red]shortcut suspected[/]" if r["shortcut_suspected"] else "[green]no shortcut found[/]")
              + f" ({b.name} v{b.version} on {data})")
    for p in r["probes"].values():
        con.print(f"- {p['verdict']}")
    con.print(f"report: {out / 'audit.md'}")



def register(app: typer.Typer) -> None:
    app.command("audit")(audit)
