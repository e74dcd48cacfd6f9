"""What every sub-command shares: one way to fail with a message, one way to open a bundle."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console

err_console = Console(stderr=True)


def fail(msg: str, code: int = 2) -> NoReturn:
    """Print a red one-line error on stderr and exit (2: bad arguments or unusable input)."""
    err_console.print(f"[bold red]error:[/] {msg}", soft_wrap=True)
    raise typer.Exit(code)


def open_bundle(model: Path):
    """MODELS/<name>[/<version>] -> Bundle, or a clear error exit."""
    from covid_cxr.bundle import BundleError, load_bundle

    try:
        return load_bundle(model)
    except (BundleError, OSError, ValueError) as exc:
        fail(str(exc))
