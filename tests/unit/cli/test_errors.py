"""Argument errors: one `error:` line, exit 2, found before torch loads; the group maps UserError."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from covid_cxr.cli import app

PROBE = ("import sys; from typer.testing import CliRunner; from covid_cxr.cli import app; "
         "r = CliRunner().invoke(app, {args!r}); print(r.exit_code, 'torch' in sys.modules); print(r.output)")


def _probe(args: list[str]) -> tuple[str, str]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True, check=True)
    first, _, rest = out.stdout.partition("\n")
    return first, rest


def test_a_missing_dataset_folder_is_reported_before_torch_loads(tmp_path):
    status, text = _probe(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "m")])
    assert status == "2 False", text
    assert "dataset folder not found" in text
    assert not (tmp_path / "m").exists()  # no debris


def test_an_unknown_architecture_is_reported_before_torch_loads(tmp_path):
    status, text = _probe(["train", "--data", str(tmp_path), "--out", str(tmp_path / "m"), "--arch", "nonsense"])
    assert status == "2 False", text
    assert "unknown architecture 'nonsense'" in text


def test_a_user_error_raised_deep_in_a_command_is_one_line_and_exit_2(tmp_path):
    """No command catches UserError itself any more: the group does (cli.common.Commands)."""
    r = CliRunner().invoke(app, ["evaluate", "--model", str(tmp_path), "--data", str(tmp_path)])
    assert r.exit_code == 2
    assert r.output.startswith("error:") and "no model bundle here" in r.output
    assert "Traceback" not in r.output


def test_a_good_command_still_succeeds():
    """The other side: the group passes successful commands through (exit 0)."""
    r = CliRunner().invoke(app, ["bundle", "schema"])
    assert r.exit_code == 0, r.output
    assert '"title"' in r.output or '"properties"' in r.output
