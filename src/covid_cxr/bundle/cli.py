"""`covid-cxr bundle check MODELS/<name>[/<version>]` (registered on the main Typer app)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

bundle_app = typer.Typer(no_args_is_help=True, help="Inspect model bundles.")


@bundle_app.command("check")
def check(path: Annotated[Path, typer.Argument(help="MODELS/<name> (newest version) or MODELS/<name>/<version>")]):
    """Schema valid, files present, ONNX inputs/outputs as the metadata says, one image runs.
    Exit 0 and one line on success; exit 2 and one line naming the file and the fault otherwise."""
    from rich.console import Console

    from covid_cxr.cliutil import open_bundle

    b = open_bundle(path)
    fmt = f"format {b.format_on_disk}" + (" (read as 2)" if b.format_on_disk == 1 else "")
    Console().print(f"ok: {b.path} ({b.name} v{b.version}, {fmt}, {b.metadata.task}, "
                    f"{b.metadata.architecture.name}, input {b.input_hw[0]}x{b.input_hw[1]}, "
                    f"classes {', '.join(b.classes)})", soft_wrap=True)


@bundle_app.command("schema")
def schema():
    """Print the JSON Schema of metadata.json (format 2), as committed in docs/bundle.schema.json."""
    from covid_cxr.bundle.schema import json_schema

    typer.echo(json_schema(), nl=False)


def register(app: typer.Typer) -> None:
    app.add_typer(bundle_app, name="bundle")
