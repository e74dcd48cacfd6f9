"""`python -m covid_cxr` == the `covid-cxr` command."""

from covid_cxr.cli import app

app()
