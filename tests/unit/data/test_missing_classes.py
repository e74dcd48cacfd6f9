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
