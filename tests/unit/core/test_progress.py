"""Progress in a log: lines every few seconds with count, rate and time left, naming the step."""

from __future__ import annotations

import re

from covid_cxr.core import progress


def test_a_log_gets_lines_with_rate_and_the_step(capsys, monkeypatch):
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    with progress.step("member 2/3"), progress.step("fine-tuning"):
        assert list(progress.progress_iter(range(5), "epochs", every=0.0)) == list(range(5))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 5  # four periodic lines, then one 'done' (not a second 5/5)
    assert all("member 2/3, fine-tuning: epochs" in line for line in lines)
    assert re.search(r"epochs 2/5 \(\d+(\.\d+)?/s, \d+s left, \d+s\)$", lines[1]), lines[1]
    assert lines[-1].endswith("done") and "5/5" in lines[-1]


def test_quiet_when_disabled_and_nothing_lost(capsys, monkeypatch):
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    assert list(progress.progress_iter(iter("abc"), "x", enabled=False)) == ["a", "b", "c"]
    assert capsys.readouterr().err == ""


def test_durations_read_as_minutes_and_seconds():
    assert progress.duration(5.4) == "5s"
    assert progress.duration(125) == "2m05s"
