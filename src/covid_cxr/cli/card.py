"""`covid-cxr card MODELS/<name>[/<version>]` (registered on the main Typer app)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def card(path: Annotated[Path, typer.Argument(help="MODELS/<name> (newest version) or MODELS/<name>/<version>")]):
    """Write MODEL_CARD.md and MODEL_CARD.html into the bundle, from its metadata.json and report/
    alone (intended use, data and shortcuts, evaluation with intervals, calibration, gate, audit,
    limitations, how to reproduce). New bundles get one when written; this refreshes it, e.g.
    after `covid-cxr audit --out MODELS/<name>/<version>/report`."""
    from rich.console import Console

    from covid_cxr.bundle.card import write_bundle_card
    from covid_cxr.cli.common import fail, open_bundle

    b = open_bundle(path, check=False)
    try:
        md, html = write_bundle_card(b)
    except OSError as exc:
        fail(f"{b.path}: cannot write the card: {exc.strerror or exc}")
    Console().print(f"card: {md}\n      {html}", soft_wrap=True, highlight=False)


def register(app: typer.Typer) -> None:
    app.command("card")(card)
