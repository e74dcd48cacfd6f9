"""core.files.atomic_folder: a report folder appears whole or not at all, and never takes a user's
other files with it."""

from __future__ import annotations

import pytest

from covid_cxr.core.files import atomic_folder


def test_a_new_folder_appears_whole(tmp_path):
    out = tmp_path / "runs" / "evaluate" / "r"
    with atomic_folder(out) as tmp:
        (tmp / "metrics.json").write_text("{}")
        assert not out.exists()  # nothing under the final name until the end
    assert [p.name for p in out.iterdir()] == ["metrics.json"]
    assert [p.name for p in out.parent.iterdir()] == ["r"]  # no temporary sibling left


def test_a_failure_leaves_nothing_it_made(tmp_path):
    out = tmp_path / "runs" / "evaluate" / "r"
    with pytest.raises(RuntimeError), atomic_folder(out) as tmp:
        (tmp / "metrics.json").write_text("{}")
        raise RuntimeError("plot failed")
    assert list(tmp_path.iterdir()) == []  # not even the runs/evaluate it created


def test_into_an_existing_folder_only_namesakes_are_replaced(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "metrics.json").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_folder(out) as tmp:
        (tmp / "metrics.json").write_text("half")
        raise KeyboardInterrupt
    assert (out / "metrics.json").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    with atomic_folder(out) as tmp:
        (tmp / "metrics.json").write_text("new")
    assert (out / "metrics.json").read_text() == "new" and (out / "notes.txt").read_text() == "keep me"
