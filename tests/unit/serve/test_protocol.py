"""TF Serving predict bodies -> one float32 batch, or a BadRequest saying what is wrong."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from covid_cxr.serve.protocol import BadRequest, parse_predict, signature_def

H = W = 8


def _png(value: int = 128, size: int = 20) -> str:
    buf = io.BytesIO()
    Image.new("L", (size, size), value).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _parse(obj, max_instances: int = 4):
    return parse_predict(json.dumps(obj).encode(), H, W, max_instances)


def test_row_and_columnar_formats_and_shapes():
    img = np.full((H, W), 0.25).tolist()
    for inst in (img, [[[v] for v in row] for row in img], [[[v] * 3 for v in row] for row in img]):
        x, columnar = _parse({"instances": [inst, inst]})
        assert x.shape == (2, H, W, 1) and x.dtype == np.float32 and not columnar
        assert np.allclose(x, 0.25)
    x, columnar = _parse({"inputs": [img]})
    assert columnar and x.shape == (1, H, W, 1)
    x, _ = _parse({"signature_name": "serving_default", "instances": [{"image": img}]})
    assert x.shape == (1, H, W, 1)


def test_b64_images_are_decoded_and_resized():
    x, _ = _parse({"instances": [{"b64": _png(255)}, {"b64": _png(0)}]})
    assert x.shape == (2, H, W, 1) and np.allclose(x[0], 1) and np.allclose(x[1], 0)
    x, columnar = _parse({"inputs": {"b64": _png(255)}})
    assert columnar and x.shape == (1, H, W, 1)


@pytest.mark.parametrize("body, message", [
    (b"{not json", "malformed JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"instances": [], "inputs": []}', "exactly one of"),
    (b'{"instances": []}', "no instances"),
    (b'{"signature_name": "other", "instances": [[0]]}', "signature name 'other' not found"),
    (b'{"instances": [[[0, 1], [1]]]}', "ragged"),
    (b'{"instances": [[["a"]]]}', "numbers"),
    (b'{"instances": [[[0.5]]]}', "does not match the model's input"),
    (b'{"instances": [{"b64": "***"}]}', "invalid base64"),
    (b'{"instances": [{"b64": "aGVsbG8="}]}', "undecodable image"),
    (b'{"instances": [{"pixels": [0]}]}', "unknown input name"),
    (b'{"instances": [1e400]}', "expected a tensor"),
])
def test_bad_bodies_are_bad_requests(body, message):
    with pytest.raises(BadRequest, match=message):
        parse_predict(body, H, W, 4)


def test_too_many_instances():
    img = np.zeros((H, W)).tolist()
    with pytest.raises(BadRequest, match="at most 4"):
        _parse({"instances": [img] * 5})


def test_non_finite_values_are_rejected():
    img = np.zeros((H, W)).tolist()
    img[0][0] = 1e39  # beyond float32
    with pytest.raises(BadRequest, match="NaN or infinite"):
        _parse({"instances": [img]})


def test_signature_def_describes_the_model():
    sig = signature_def(224, 224, 3)["signature_def"]["serving_default"]
    assert [d["size"] for d in sig["inputs"]["image"]["tensor_shape"]["dim"]] == ["-1", "224", "224", "1"]
    assert [d["size"] for d in sig["outputs"]["probabilities"]["tensor_shape"]["dim"]] == ["-1", "3"]
