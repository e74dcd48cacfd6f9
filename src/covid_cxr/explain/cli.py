"""`covid-cxr explain` (registered on the main Typer app by `register`)."""

import typer


def register(app: typer.Typer) -> None:
    pass  # filled in by the explain work
