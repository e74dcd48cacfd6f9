"""The model repository under odd folders, broken newest versions and stale staging folders:
the API keeps answering, says which file is wrong without filesystem paths, and cleans up."""

from __future__ import annotations

import os
import shutil
import time

import requests

from covid_cxr.serve.settings import ServeSettings
from covid_cxr.serve.testing import running_server

KEY = "k3y"
TENSOR = {"instances": [[[0.5] * 64] * 64]}


def test_odd_folders_are_ignored_and_the_api_keeps_working(bundle_copy):
    models = bundle_copy.parents[1]
    for odd in ("²", "①", "00", "1x"):
        (models / "tiny" / odd).mkdir()
        shutil.copy(bundle_copy / "metadata.json", models / "tiny" / odd / "metadata.json")
    (models / "bad name").mkdir()
    with running_server(ServeSettings(models=models, rescan_seconds=0.2)) as base:
        listing = requests.get(f"{base}/api/v1/models")
        assert listing.status_code == 200
        assert listing.json()["models"][0]["versions"] == [1]
        assert requests.get(f"{base}/v1/models/tiny").status_code == 200
        assert requests.get(f"{base}/v1/models/tiny/metadata").status_code == 200
        assert requests.post(f"{base}/v1/models/tiny:predict", json=TENSOR).status_code == 200


def test_metadata_describes_the_served_version(bundle_copy):
    v2 = bundle_copy.parent / "2"
    shutil.copytree(bundle_copy, v2)
    text = (v2 / "metadata.json").read_text()
    (v2 / "metadata.json").write_text(text[: len(text) // 2])  # truncated newest version
    with running_server(ServeSettings(models=bundle_copy.parents[1], rescan_seconds=0.2)) as base:
        r = requests.get(f"{base}/v1/models/tiny/metadata")
        assert r.status_code == 200 and r.json()["model_spec"]["version"] == "1"
        assert requests.post(f"{base}/v1/models/tiny:predict", json=TENSOR).status_code == 200


def test_no_loadable_version_is_503_without_filesystem_paths(bundle_copy, tmp_path):
    (bundle_copy / "model.onnx").write_bytes(b"not onnx")
    settings = ServeSettings(models=bundle_copy.parents[1], api_key=KEY, rescan_seconds=0.2)
    with running_server(settings, wait_ready=False) as base:
        deadline = time.monotonic() + 20
        while requests.get(f"{base}/v1/models/tiny").json()["model_version_status"][0]["state"] == "LOADING":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        status = requests.get(f"{base}/v1/models/tiny")  # no key: public
        meta = requests.get(f"{base}/v1/models/tiny/metadata", headers={"Authorization": f"Bearer {KEY}"})
        assert meta.status_code == 503 and "error" in meta.json()
        assert requests.get(f"{base}/readyz").status_code == 503
        for r in (status, meta):
            assert str(tmp_path) not in r.text and "/tmp" not in r.text, r.text
            assert "model.onnx" in r.text  # still says which file


def test_server_scan_cleans_stale_staging(bundle_copy):
    stale = bundle_copy.parent / ".tmp-killed"
    stale.mkdir()
    os.utime(stale, (time.time() - 7200,) * 2)
    with running_server(ServeSettings(models=bundle_copy.parents[1], rescan_seconds=0.2)):
        deadline = time.monotonic() + 10
        while stale.exists():
            assert time.monotonic() < deadline
            time.sleep(0.1)
