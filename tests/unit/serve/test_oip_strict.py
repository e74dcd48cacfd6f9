"""Issue 17 (items 1 and 7): v2 infer refuses what TF Serving's predict refuses - strings and
booleans as FP32 data, JSON nested too deeply - with a 400 JSON error, and still takes good FP32
data (numbers, ints among them; flat or nested)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import requests

from covid_cxr.serve.oip import image_batch, parse_infer
from covid_cxr.serve.protocol import BadRequest, may_hold_bools, parse_predict
from covid_cxr.serve.settings import ServeSettings
from covid_cxr.serve.testing import running_server

H = W = 4


def _body(data, shape=(1, H, W, 1), datatype="FP32") -> bytes:
    return json.dumps({"inputs": [{"name": "image", "shape": list(shape), "datatype": datatype, "data": data}]}).encode()


def _batch(body: bytes) -> np.ndarray:
    return image_batch(parse_infer(body, None), H, W, 8)


def test_fp32_takes_numbers_flat_or_nested():
    flat = [0.5] * (H * W - 1) + [1]  # an int among the floats is a number too
    assert _batch(_body(flat)).shape == (1, H, W, 1)
    nested = np.full((1, H, W, 1), 0.25).tolist()
    assert np.all(_batch(_body(nested)) == np.float32(0.25))


@pytest.mark.parametrize("bad, why", [
    (["0.5"] * (H * W), "strings"),
    ([0.5] * (H * W - 1) + ["0.5"], "strings"),
    ([True] * (H * W), "booleans"),
    ([0.5] * (H * W - 1) + [True], "booleans"),  # numpy alone would read it as 1.0
    (np.full((1, H, W, 1), False).tolist(), "booleans"),
    ([None] * (H * W), "non-numeric"),
])
def test_fp32_refuses_strings_and_booleans(bad, why):
    with pytest.raises(BadRequest, match=why):
        _batch(_body(bad))


def test_tf_serving_refuses_booleans_among_numbers_too():
    good = np.full((H, W), 0.5).tolist()
    assert parse_predict(json.dumps({"instances": [good]}).encode(), H, W, 8)[0].shape == (1, H, W, 1)
    good[0][0] = True
    with pytest.raises(BadRequest, match="booleans"):
        parse_predict(json.dumps({"instances": [good]}).encode(), H, W, 8)


def test_the_boolean_check_is_skipped_only_where_the_json_cannot_hold_one():
    assert not may_hold_bools(b'{"instances": [[0.5, 1, 2e-3]]}')
    assert may_hold_bools(b'{"instances": [[0.5, true]]}') and may_hold_bools(b'[false]')
    assert may_hold_bools(b'{"b64": "trueXYZ"}')  # inside a string too: the check runs, never skipped wrongly
    body = json.dumps({"instances": [[[0.5] * W] * (H - 1) + [[0.5] * (W - 1) + [True]]]}).encode()
    with pytest.raises(BadRequest, match="booleans"):  # the body holds `true`: still refused
        parse_predict(body, H, W, 8)


@pytest.mark.parametrize("where", ["data", "parameters", "outside"])
def test_deep_json_is_a_bad_request(where):
    deep = "[" * 100_000 + "]" * 100_000
    body = {"data": _body_text(deep, None), "parameters": _body_text("0", deep),
            "outside": deep}[where]
    with pytest.raises(BadRequest, match="nested too deeply"):
        parse_infer(body.encode(), None)


def _body_text(data: str, parameters: str | None) -> str:
    params = "" if parameters is None else f', "parameters": {{"x": {parameters}}}'
    return f'{{"inputs": [{{"name": "image", "shape": [1, {H}, {W}, 1], "datatype": "FP32", "data": {data}{params}}}]}}'


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    models = tmp_path_factory.mktemp("strict") / "models"
    shutil.copytree(tiny_models / "tiny" / "1", models / "tiny" / "1")
    with running_server(ServeSettings(models=models, rescan_seconds=5)) as url:
        yield url


def test_live_v2_answers_400_json_for_strings_booleans_and_deep_json(server):
    url = f"{server}/v2/models/tiny/infer"
    n = 64 * 64
    good = requests.post(url, data=_body([0.5] * n, (1, 64, 64, 1)), timeout=30)
    assert good.status_code == 200 and good.json()["outputs"][0]["name"] == "probabilities"
    for body in (_body(["0.5"] * n, (1, 64, 64, 1)), _body([True] * n, (1, 64, 64, 1)),
                 ("[" * 100_000 + "]" * 100_000).encode(),
                 _body_text("[" * 100_000 + "]" * 100_000, None).encode()):
        r = requests.post(url, data=body, timeout=30)
        assert r.status_code == 400, r.text[:300]
        assert set(r.json()) == {"error"} and "Traceback" not in r.text
    assert requests.get(f"{server}/readyz", timeout=10).status_code == 200  # still serving
