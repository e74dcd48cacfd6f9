"""Data stage on real X-rays: every layout, every bad-file kind, duplicates, splits, statistics."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from covid_cxr.data import build_manifest, decode_gray, discover, prepare
from covid_cxr.data.decode import DecodeError
from tests.conftest import sample_images
from tests.unit.images import _bomb_png

REAL_DIRS = {"COVID-19": "COVID", "Normal": "Normal", "Viral Pneumonia": "Viral Pneumonia"}


def _real(data_dir: Path, n: int = 3) -> dict[str, list[Path]]:
    s = sample_images(data_dir, n)
    return {label: s[folder] for label, folder in REAL_DIRS.items()}


def _copy_layout(data_dir: Path, root: Path, layout: str, n: int = 3) -> Path:
    """Re-create the database's own layouts from real images."""
    names = {"release1": {"COVID-19": "COVID-19", "Normal": "NORMAL", "Viral Pneumonia": "Viral Pneumonia"},
             "release2": {"COVID-19": "COVID", "Normal": "Normal", "Viral Pneumonia": "Viral Pneumonia"},
             "plain": {"COVID-19": "covid", "Normal": "normal", "Viral Pneumonia": "viral_pneumonia"}}[layout]
    for label, files in _real(data_dir, n).items():
        d = root / names[label]
        if layout == "release2":
            (d / "masks").mkdir(parents=True)
            d = d / "images"
        d.mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(files, 1):
            target = d / (f"{names[label]} ({i}).png" if layout == "release1" else f.name)
            shutil.copy(f, target)
            if layout == "release2":
                shutil.copy(f, root / names[label] / "masks" / f.name)  # masks must be ignored
    if layout == "release2":
        (root / "Lung_Opacity" / "images").mkdir(parents=True)
        shutil.copy(_real(data_dir, 1)["Normal"][0], root / "Lung_Opacity" / "images" / "Lung_Opacity-1.png")
    return root


@pytest.mark.parametrize("layout", ["release1", "release2", "plain"])
def test_every_layout_gives_the_same_classes(data_dir, tmp_path, layout):
    root = _copy_layout(data_dir, tmp_path / "ds", layout)
    d = discover(root)
    labels = sorted(f.label for f in d.files)
    assert labels == sorted(["COVID-19"] * 3 + ["Normal"] * 3 + ["Viral Pneumonia"] * 3)
    assert not any("masks" in f.relpath for f in d.files)
    if layout == "release2":
        assert d.excluded_classes == {"Lung_Opacity": 1}
        with_opacity = discover(root, ["COVID", "Normal", "Viral Pneumonia", "Lung_Opacity"])
        assert sum(f.label == "Lung_Opacity" for f in with_opacity.files) == 1


def test_wrapper_folder_is_descended(data_dir, tmp_path):
    root = _copy_layout(data_dir, tmp_path / "ds" / "COVID-19_Radiography_Dataset", "release2")
    assert len(discover(tmp_path / "ds").files) == 9 and root.is_dir()


def test_every_bad_file_is_skipped_with_its_reason(data_dir, tmp_path):
    root = _copy_layout(data_dir, tmp_path / "ds", "release2", n=4)
    bad = root / "COVID" / "images"
    good = (bad / sorted(p.name for p in bad.iterdir())[0]).read_bytes()
    (bad / "empty.png").write_bytes(b"")
    (bad / "truncated.png").write_bytes(good[: len(good) // 2])
    (bad / "notes.txt").write_text("not an image")
    (bad / "fake.png").write_bytes(b"GIF89a" + b"\0" * 100)
    (bad / "bomb.png").write_bytes(_bomb_png(20000, 20000))
    (bad / "copy.png").write_bytes(good)  # exact duplicate
    man = build_manifest(root, progress=False)
    by = {Path(r.path).name: r for r in man.records}
    assert by["empty.png"].status == "skipped" and "empty" in by["empty.png"].reason
    assert by["truncated.png"].status == "skipped" and by["truncated.png"].reason
    assert by["notes.txt"].status == "skipped"
    assert by["fake.png"].status == "skipped"
    assert by["bomb.png"].status == "skipped" and "too many pixels" in by["bomb.png"].reason
    dup = [r for r in man.records if r.status == "duplicate"]
    assert len(dup) == 1 and "exact copy" in dup[0].reason
    assert sum(r.status == "ok" for r in man.records) == 12  # 4 per class, the copy not counted
    with pytest.raises(DecodeError):
        decode_gray(b"")


@pytest.fixture(scope="module")
def real_manifest(data_dir):
    return build_manifest(data_dir, progress=False)


def test_manifest_of_the_real_dataset(real_manifest):
    assert len(real_manifest.records) == 4137
    assert all(r.status == "ok" and len(r.sha256) == 64 and len(r.phash) == 16 for r in real_manifest.records)
    assert {r.label for r in real_manifest.records} == {"COVID-19", "Normal", "Viral Pneumonia"}


def test_group_aware_split_is_disjoint_stratified_and_keeps_near_duplicates_together(data_dir, real_manifest):
    p = prepare(data_dir, balance="weights", seed=3, manifest=real_manifest)
    paths = {s: {r.path for r in rs} for s, rs in p.splits.items()}
    assert not (paths["train"] & paths["val"]) and not (paths["train"] & paths["test"]) and not (paths["val"] & paths["test"])
    shas = {s: {r.sha256 for r in rs} for s, rs in p.splits.items()}
    assert not (shas["train"] & shas["test"])
    group_split = {}
    for s, rs in p.splits.items():
        for r in rs:
            assert group_split.setdefault(r.group, s) == s, "a near-duplicate group straddles splits"
    assert p.dedupe["near_groups"] > 0  # the real database has near duplicates: the check is live
    n = sum(len(rs) for rs in p.splits.values())
    assert n == 4137
    for c in p.classes:
        total = sum(r.label == c for rs in p.splits.values() for r in rs)
        assert abs(sum(r.label == c for r in p.splits["test"]) - 0.15 * total) <= 3
    again = prepare(data_dir, balance="weights", seed=3, manifest=real_manifest)
    assert [r.path for r in again.splits["test"]] == [r.path for r in p.splits["test"]]  # seeded
    assert p.class_weights[2] > p.class_weights[0]  # fewer Viral Pneumonia images -> heavier weight


def test_undersampling_as_the_study_did(data_dir, real_manifest):
    p = prepare(data_dir, balance="undersample", max_per_class=219, seed=0, manifest=real_manifest)
    totals = {c: sum(r.label == c for rs in p.splits.values() for r in rs) for c in p.classes}
    assert totals == {"COVID-19": 219, "Normal": 219, "Viral Pneumonia": 219}
    p2 = prepare(data_dir, balance="undersample", seed=0, manifest=real_manifest)
    assert {c: sum(r.label == c for rs in p2.splits.values() for r in rs) for c in p2.classes} == \
        {c: 1137 for c in p2.classes}


def test_normalisation_comes_from_the_training_split_only(data_dir, real_manifest):
    from covid_cxr.data.decode import decode_file

    p = prepare(data_dir, balance="undersample", max_per_class=30, seed=1, manifest=real_manifest)
    px = np.concatenate([decode_file(data_dir / r.path).pixels.ravel() for r in p.splits["train"]])
    assert p.mean == pytest.approx(px.mean(), abs=1e-4)
    assert p.std == pytest.approx(px.std(), abs=1e-4)
    test_px = np.concatenate([decode_file(data_dir / r.path).pixels.ravel() for r in p.splits["test"]])
    assert abs(test_px.mean() - p.mean) > 1e-5  # differs from the test split's own statistics


def test_duplicate_counts_reach_the_prepared_data(data_dir, tmp_path):
    root = _copy_layout(data_dir, tmp_path / "ds", "release1", n=8)
    first = next((root / "NORMAL").iterdir())
    shutil.copy(first, root / "NORMAL" / "NORMAL (99).png")
    assert discover(root).layout.startswith("release-1")
    p = prepare(root, balance="none", seed=0, progress=False)
    assert p.dedupe["exact_duplicates"] == 1
    assert p.describe()["exact_duplicates_removed"] == 1
