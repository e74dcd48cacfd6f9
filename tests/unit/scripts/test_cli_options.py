"""The option table of every command (docs/cli_options.md) is current, and every option has help."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def _script():
    spec = importlib.util.spec_from_file_location("cli_options", REPO / "scripts" / "cli_options.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_table_is_current():
    assert (REPO / "docs" / "cli_options.md").read_text() == _script().table() + "\n", \
        "run: python scripts/cli_options.py"


def test_every_option_and_argument_has_help():
    script = _script()
    import typer.main

    from covid_cxr.cli import app

    missing = [f"{name} {n}" for name, cmd in script.commands(typer.main.get_group(app))
               for n, _, h in script.rows(cmd) if not h]
    assert missing == [], missing
    assert len(list(script.commands(typer.main.get_group(app)))) >= 20  # the walk reaches sub-commands too
