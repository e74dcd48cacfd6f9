"""A labelled folder lacking some classes: refused for training, accepted when asked (evaluation)."""

from __future__ import annotations

import pytest

from covid_cxr.data.layouts import discover
from covid_cxr.core.errors import DataNotFound

CLASSES = ["COVID-19", "Normal", "Viral Pneumonia"]


def test_missing_classes_refused_by_default_accepted_on_request(tmp_path):
    (tmp_path / "COVID").mkdir()
    (tmp_path / "COVID" / "a.png").write_bytes(b"x")
    with pytest.raises(DataNotFound, match="Normal"):
        discover(tmp_path, CLASSES)
    found = discover(tmp_path, CLASSES, allow_missing=True)
    assert [f.label for f in found.files] == ["COVID-19"]


def test_a_folder_with_none_of_the_classes_is_refused_even_so(tmp_path):
    (tmp_path / "cats").mkdir()
    with pytest.raises(DataNotFound, match="no folder for class"):
        discover(tmp_path, CLASSES, allow_missing=True)


def test_prepare_splits_a_site_lacking_a_class_only_when_asked(tiny_data, tmp_path):
    """A site adapting a bundle (its classes fixed) may send no films of a class: `prepare` splits
    the classes it has when asked (train --init-from), and refuses otherwise."""
    import shutil

    from covid_cxr.core.errors import UserError
    from covid_cxr.data import prepare

    site = tmp_path / "site"
    for c in CLASSES[:2]:
        shutil.copytree(tiny_data / c, site / c)
    with pytest.raises(UserError, match="Viral Pneumonia"):
        prepare(site, CLASSES, progress=False)
    p = prepare(site, CLASSES, progress=False, allow_missing=True)
    assert list(p.classes) == CLASSES
    assert {r.label for s in p.splits.values() for r in s} == set(CLASSES[:2])
    assert sum(len(s) for s in p.splits.values()) == 24  # undersampling counts the classes present only
