"""Every command legible at 80 columns (issue 20): each command's and group's --help, and the main
outputs on tiny data (predict table, bundle check, card, site check, score, data inspect, evaluate,
export), with COLUMNS=80: no line wider than 80, no option name cut short with an ellipsis."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from covid_cxr.cli import app

WIDTH = 80


def too_wide(text: str) -> list[str]:
    """Lines wider than WIDTH characters, and lines rich cut short ('…')."""
    return [line for line in text.splitlines() if len(line) > WIDTH or "…" in line]


def test_the_checker_flags_wide_and_cut_lines():
    assert too_wide("a" * 80 + "\n" + "b" * 10) == []
    assert too_wide("a" * 81) == ["a" * 81] and too_wide("--decode-budget-pixe…") == ["--decode-budget-pixe…"]


def _every_command(group, path=()):
    yield path
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _every_command(cmd, (*path, name))
        else:
            yield (*path, name)


def test_every_help_fits_80_columns():
    commands = list(_every_command(typer.main.get_command(app)))
    assert len(commands) > 25 and ("site", "check") in commands and ("score",) in commands
    for path in commands:
        res = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": str(WIDTH), "NO_COLOR": "1"})
        assert res.exit_code == 0 and "Usage" in res.output, (path, res.output)
        assert too_wide(res.output) == [], (path, too_wide(res.output))


OUTPUTS = {  # command -> text its output must show (the other side: it ran and said something)
    "predict data/Normal/Normal-0.png data/COVID-19/COVID-19-0.png --model models/tiny": "Normal-0.png",
    "bundle check models/tiny": "ok: models/tiny/1",
    "card models/tiny": "MODEL_CARD.md",
    "site check --model models/tiny --data data": "next step:",
    "score --model models/tiny --data data --out p.parquet": "images scored",
    "data inspect data": "exact duplicates",
    "evaluate --model models/tiny --data data --out ev": "accuracy",
    "export --models models --out triton": "config.pbtxt",
}

PROBE = """
import json, sys
from typer.testing import CliRunner
from covid_cxr.cli import app
out = {c: CliRunner().invoke(app, c.split()) for c in json.loads(sys.argv[1])}
print(json.dumps({c: [r.exit_code, r.output] for c, r in out.items()}))
"""


@pytest.mark.slow  # a subprocess runs eight commands (~5 s): in `make test`, not `make test-fast`
def test_main_outputs_fit_80_columns(tiny_models, tiny_data, tmp_path):
    """Relative paths (run from the folder that holds them), as a user at a terminal would type."""
    shutil.copytree(tiny_models / "tiny", tmp_path / "models" / "tiny")
    shutil.copytree(tiny_data, tmp_path / "data")
    env = {**os.environ, "COLUMNS": str(WIDTH), "NO_COLOR": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[3] / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", PROBE, json.dumps(list(OUTPUTS))], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads(res.stdout.splitlines()[-1])
    for command, (code, text) in results.items():
        assert code == 0 and OUTPUTS[command] in text, (command, text)
        assert too_wide(text) == [], (command, too_wide(text))
    assert too_wide(res.stderr) == [], too_wide(res.stderr)  # the score's log lines
