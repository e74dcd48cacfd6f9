"""`covid-cxr serve` (registered on the main Typer app by `register`)."""

import typer


def register(app: typer.Typer) -> None:
    pass  # filled in by the serving work
