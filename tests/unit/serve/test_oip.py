"""The Open Inference Protocol (KServe v2) on a live server, spoken by the real `tritonclient[http]`:
health, metadata, FP32 and BYTES infers (binary and JSON), errors; answers equal TF Serving's."""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
import requests
from PIL import Image

from covid_cxr.data.decode import load_for_model
from covid_cxr.serve.settings import ServeSettings
from covid_cxr.serve.testing import running_server

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    models = tmp_path_factory.mktemp("oip") / "models"
    shutil.copytree(tiny_models / "tiny" / "1", models / "tiny" / "1")
    with running_server(ServeSettings(models=models, rescan_seconds=0.5)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    c = httpclient.InferenceServerClient(url=server.removeprefix("http://"))
    yield c
    c.close()


def _files(tiny_data, n=4) -> list[bytes]:
    paths = sorted(p for p in tiny_data.rglob("*.png"))[::9][:n]
    return [p.read_bytes() for p in paths]


def _tfs(server, instances) -> np.ndarray:
    r = requests.post(f"{server}/v1/models/tiny:predict", json={"instances": instances}, timeout=30)
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["predictions"], np.float32)


def test_health_and_metadata(client, server):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "1")
    assert not client.is_model_ready("tiny", "7")
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    meta = client.get_model_metadata("tiny")
    assert meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 64, 64, 1]}]
    assert meta["outputs"][0] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}
    # the trust outputs (issue 8) appear from the bundle's metadata, with no change to this router
    assert [o["name"] for o in meta["outputs"][1:]] == ["ood_score", "in_distribution"]
    assert client.get_model_metadata("tiny", "1")["name"] == "tiny"
    assert client.get_model_config("tiny")["input"][0]["dims"] == [64, 64, 1]
    with pytest.raises(InferenceServerException, match="not found"):
        client.get_model_metadata("nope")


@pytest.mark.parametrize("binary", [True, False])
def test_fp32_infer_equals_tf_serving(client, server, tiny_data, binary):
    x = np.stack([load_for_model(f, 64, 64) for f in _files(tiny_data)])[..., None]
    inp = httpclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("probabilities", binary_data=binary)
    res = client.infer("tiny", [inp], outputs=[out], request_id="r1")
    got = res.as_numpy("probabilities")
    assert res.get_response()["id"] == "r1" and got.shape == (4, 3)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
    assert np.abs(got - _tfs(server, x.tolist())).max() <= 1e-6
    pinned = client.infer("tiny", [inp], model_version="1").as_numpy("probabilities")  # all outputs
    assert np.abs(pinned - got).max() <= 1e-6


def test_bytes_infer_decodes_files_as_tf_serving_b64(client, server, tiny_data):
    files = _files(tiny_data)
    buf = io.BytesIO()
    Image.open(io.BytesIO(files[0])).convert("L").save(buf, format="JPEG", quality=95)
    files.append(buf.getvalue())  # JPEG too
    inp = httpclient.InferInput("image", [len(files)], "BYTES")
    inp.set_data_from_numpy(np.array(files, dtype=np.object_))
    got = client.infer("tiny", [inp]).as_numpy("probabilities")
    want = _tfs(server, [{"b64": base64.b64encode(f).decode()} for f in files])
    assert got.shape == (5, 3) and np.abs(got - want).max() <= 1e-6
    # JSON without the binary extension: BYTES elements carry base64 strings
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(files[0]).decode()]}]}
    r = requests.post(f"{server}/v2/models/tiny/infer", json=body, timeout=30)
    assert r.status_code == 200 and r.json()["model_version"] == "1"
    assert np.abs(np.asarray(r.json()["outputs"][0]["data"]) - want[0]).max() <= 1e-6


@pytest.mark.parametrize("body, status, words", [
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64, 64, 1], "data": [0.0] * 4096}]}, 400, "one input"),
    ({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 32, 32, 1], "data": [0.0] * 1024}]}, 400, "shape"),
    ({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 64, 64, 1], "data": [0.0] * 5}]}, 400, "values"),
    ({"inputs": [{"name": "image", "datatype": "INT8", "shape": [1, 64, 64, 1], "data": [0] * 4096}]}, 400, "datatype"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGVsbG8="]}]}, 400, "undecodable"),
    ({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 64, 64, 1], "data": [0.0] * 4096}],
      "outputs": [{"name": "logits"}]}, 400, "unknown output"),
    ({"inputs": "nope"}, 400, "malformed"),
])
def test_errors_are_json(server, body, status, words):
    r = requests.post(f"{server}/v2/models/tiny/infer", data=json.dumps(body), timeout=30)
    assert r.status_code == status and words in r.json()["error"], r.text
    r = requests.post(f"{server}/v2/models/absent/infer", data=json.dumps(body), timeout=30)
    assert r.status_code == 404 and "error" in r.json()


def test_binary_header_length_checked(server):
    r = requests.post(f"{server}/v2/models/tiny/infer", data=b"{}", timeout=30,
                      headers={"Inference-Header-Content-Length": "99"})
    assert r.status_code == 400 and "outside the body" in r.json()["error"]
