"""`covid-cxr data download`: offline it fails fast with one line saying what to do."""

from __future__ import annotations

import time

import pytest
from typer.testing import CliRunner

from covid_cxr.cli import app
from covid_cxr.data.download import data_root

pytest.importorskip("kagglehub")


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:9", "https://192.0.2.1"])  # refused; black hole
def test_offline_fails_within_10_s_in_one_line(endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLE_API_ENDPOINT", endpoint)
    t0 = time.monotonic()
    r = CliRunner().invoke(app, ["data", "download", str(tmp_path / "d")])
    assert time.monotonic() - t0 < 10
    assert r.exit_code == 2 and "Traceback" not in r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(" ".join(lines).split("error: ")) == 2 and "cannot reach" in r.output and "--data" in r.output


def test_data_root_finds_the_nested_class_folders(tmp_path):
    (tmp_path / "COVID-19_Radiography_Dataset" / "COVID").mkdir(parents=True)
    assert data_root(tmp_path) == tmp_path / "COVID-19_Radiography_Dataset"
