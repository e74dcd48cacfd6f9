"""One hostile model folder is that model's problem only (issue 17, item 4): metadata.json holding
100,000 nested brackets (RecursionError in the JSON parser) must leave the other models answering,
make /readyz say which model is unavailable, and give `bundle check` one error line, exit 2."""

from __future__ import annotations

import base64
import io
import shutil
import time

import numpy as np
import pytest
import requests
from PIL import Image
from typer.testing import CliRunner

from covid_cxr.bundle.reader import BundleError, MAX_METADATA_BYTES, read_json_file
from covid_cxr.serve.settings import ServeSettings
from covid_cxr.serve.testing import running_server

DEEP = "[" * 100_000 + "]" * 100_000


def _png() -> str:
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64), 120, np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_json_reader_turns_what_parsers_throw_into_one_line(tmp_path):
    f = tmp_path / "metadata.json"
    f.write_text('{"task": "classification"}')
    assert read_json_file(f) == {"task": "classification"}
    for text, why in ((DEEP, "nested too deep"), ("{", "not valid JSON"), ("1" * 5000, "not usable JSON")):
        f.write_text(text)
        with pytest.raises(BundleError, match=why) as err:
            read_json_file(f)
        assert "\n" not in str(err.value)
    f.write_bytes(b"\xff\xfe{}")
    with pytest.raises(BundleError, match="unreadable"):
        read_json_file(f)
    f.write_text(" " * (MAX_METADATA_BYTES + 1))
    with pytest.raises(BundleError, match="larger than"):
        read_json_file(f)


def test_bundle_check_on_deep_metadata_is_one_line_exit_2(bundle_copy):
    from covid_cxr.cli import app

    (bundle_copy / "metadata.json").write_text(DEEP)
    res = CliRunner().invoke(app, ["bundle", "check", str(bundle_copy)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in res.output


def test_one_deep_metadata_file_makes_only_that_model_unavailable(bundle_copy):
    models = bundle_copy.parents[1]
    shutil.copytree(bundle_copy, models / "evil" / "1")
    (models / "evil" / "1" / "metadata.json").write_text(DEEP)
    settings = ServeSettings(models=models, rescan_seconds=0.2)
    body = {"instances": [{"b64": _png()}]}
    with running_server(settings) as base:
        deadline = time.monotonic() + 20
        while "evil" not in requests.get(f"{base}/readyz").json().get("unavailable", {}):
            assert time.monotonic() < deadline, requests.get(f"{base}/readyz").text
            time.sleep(0.1)
        ready = requests.get(f"{base}/readyz").json()
        assert ready["models"] == ["tiny/1"] and "nested too deep" in ready["unavailable"]["evil"]
        assert requests.post(f"{base}/v1/models/tiny:predict", json=body).status_code == 200
        assert requests.get(f"{base}/v1/models/tiny").status_code == 200
        assert requests.get(f"{base}/api/v1/models").status_code == 200
        assert requests.get(f"{base}/v2/models/tiny/ready").status_code == 200
        evil = requests.post(f"{base}/v1/models/evil:predict", json=body)
        assert evil.status_code == 503 and "nested too deep" in evil.json()["error"]
        assert requests.get(f"{base}/v1/models/evil").status_code == 200  # its status says END + why
        assert requests.get(f"{base}/v2/models/evil/ready").status_code == 503
