"""The server on a real tiny bundle (loopback uvicorn): status states and metadata of the served version."""

from __future__ import annotations

import shutil

import requests

from covid_cxr.serve.settings import ServeSettings
from covid_cxr.serve.testing import running_server


def test_status_and_metadata_describe_what_is_served(tiny_models, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(tiny_models / "tiny" / "1", models / "tiny" / "1")
    shutil.copytree(tiny_models / "tiny" / "1", models / "tiny" / "2")
    (models / "tiny" / "3").mkdir()  # newest on disk, but broken: metadata.json truncated
    (models / "tiny" / "3" / "metadata.json").write_text('{"format_version": 2, "na')
    with running_server(ServeSettings(models=models, rescan_seconds=0.2)) as url:
        status = requests.get(f"{url}/v1/models/tiny", timeout=10).json()["model_version_status"]
        states = {s["version"]: s["state"] for s in status}
        # 2 answers; 1 was never loaded (not AVAILABLE, as the first release said); 3 failed to load
        assert states == {"3": "END", "2": "AVAILABLE", "1": "END"}
        broken = next(s for s in status if s["version"] == "3")["status"]
        assert broken["error_code"] == "UNKNOWN" and "metadata.json: not valid JSON" in broken["error_message"]
        meta = requests.get(f"{url}/v1/models/tiny/metadata", timeout=10)
        assert meta.status_code == 200 and meta.json()["model_spec"]["version"] == "2"
        assert meta.json()["metadata"]["input"]["height"] == 64
        pinned = requests.get(f"{url}/v1/models/tiny/versions/1/metadata", timeout=10).json()
        assert pinned["model_spec"]["version"] == "1"
        assert requests.get(f"{url}/v1/models/tiny/versions/3/metadata", timeout=10).status_code == 503
