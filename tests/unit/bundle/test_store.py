"""Staging folders left by a killed writer are removed; recent ones and symlinks are kept."""

from __future__ import annotations

import os
import time


def test_stale_staging_folders_are_cleaned(tmp_path):
    from covid_cxr.bundle.store import clean_stale, new_staging_dir

    model_dir = tmp_path / "m"
    old, fresh = model_dir / ".tmp-old", model_dir / ".tmp-fresh"
    for d in (old, fresh):
        d.mkdir(parents=True)
        (d / "model.onnx").write_bytes(b"x" * 10)
    hour_ago = time.time() - 7200
    for p in (old / "model.onnx", old):
        os.utime(p, (hour_ago, hour_ago))
    (model_dir / ".tmp-link").symlink_to(old)
    staging = new_staging_dir(model_dir)  # a writer cleans first
    assert not old.exists() and fresh.exists() and staging.exists()
    assert clean_stale(model_dir) == []  # a live writer's folder is kept


def test_an_ensembles_member_is_found_beside_it_or_where_a_recipe_trained_it(tmp_path):
    from covid_cxr.bundle.store import RECIPE_MEMBERS, member_dir

    for folder in (tmp_path / "m0" / "1", tmp_path / RECIPE_MEMBERS / "m1" / "2"):
        folder.mkdir(parents=True)
        (folder / "metadata.json").write_text("{}")
    (tmp_path / "empty").mkdir()  # a folder with no version is not a bundle
    assert member_dir(tmp_path, "m0") == tmp_path / "m0"
    assert member_dir(tmp_path, "m1") == tmp_path / RECIPE_MEMBERS / "m1"
    assert member_dir(tmp_path, "m1", 2) == tmp_path / RECIPE_MEMBERS / "m1" / "2"
    assert member_dir(tmp_path, "m1", 1) is None and member_dir(tmp_path, "empty") is None
    assert member_dir(tmp_path, "missing") is None
