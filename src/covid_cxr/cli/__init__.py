"""The `covid-cxr` command: the only package that imports typer. One module per command group;
`main` holds the app and the stage commands (train, evaluate, predict, run, demo)."""

from covid_cxr.cli.main import app

__all__ = ["app"]
