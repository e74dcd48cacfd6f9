"""`python -m covid_cxr.serve --models MODELS ...`: the serve command without the rest of the CLI."""

import typer

from covid_cxr.serve.cli import serve

if __name__ == "__main__":
    typer.run(serve)
