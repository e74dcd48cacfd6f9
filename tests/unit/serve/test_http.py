"""The HTTP layer against hostile or unlucky clients: stalled bodies, odd versions, deep JSON,
unexpected errors, and the smaller protocol findings; one regression test per finding.

Data-free: tiny generated images and the session's tiny bundle (MODELS/tiny/1, 64 px). Tests that
need a live server run one on loopback (`running_server`); the slow scenarios (thousands of
requests, 7,000 x 7,000 images) are in benchmarks/stress_serve.py.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import time
from urllib.parse import quote, urlsplit

import numpy as np
import pytest
import requests
from PIL import Image

from covid_cxr.serve.settings import ServeSettings
from covid_cxr.serve.testing import running_server

KEY = "k3y"
AUTH = {"Authorization": f"Bearer {KEY}"}
TENSOR = {"instances": [[[0.5] * 64] * 64]}


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tiny_models):
    settings = ServeSettings(models=tiny_models, api_key=KEY, body_timeout_s=1.0, max_concurrency=4,
                             rescan_seconds=0.5)
    with running_server(settings) as base:
        yield base


def connection(base: str) -> http.client.HTTPConnection:
    u = urlsplit(base)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=10)


# ---------------------------------------------------------------------------------- 1. stalled clients

def stalled_clients(base: str, n: int) -> list[socket.socket]:
    """n connections that send predict headers promising 1,000 bytes, then one byte, then nothing."""
    u = urlsplit(base)
    socks = []
    for _ in range(n):
        s = socket.create_connection((u.hostname, u.port), timeout=10)
        s.sendall(b"POST /v1/models/tiny:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{")
        socks.append(s)
    return socks


def test_stalled_clients_hold_no_predict_slot_and_get_408(server):
    socks = stalled_clients(server, 8)  # twice max_concurrency, and no API key
    try:
        time.sleep(0.2)
        t0 = time.perf_counter()
        r = requests.post(f"{server}/v1/models/tiny:predict", json=TENSOR, headers=AUTH, timeout=10)
        assert r.status_code == 200, r.text
        assert time.perf_counter() - t0 < 1.0
        socks[0].settimeout(5)
        answer = b""
        while chunk := socks[0].recv(4096):  # until the server closes it (a timeout here: it did not)
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"connection: close" in answer.lower()
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------------------------- 3. no 500, keep-alive

@pytest.mark.parametrize("version", ["²", "①", "1" * 5000, "٣"])
def test_non_ascii_and_huge_versions_are_400(server, version):
    r = requests.post(f"{server}/v1/models/tiny/versions/{quote(version)}:predict", json=TENSOR, headers=AUTH)
    assert r.status_code == 400 and "malformed model version" in r.json()["error"]
    assert requests.get(f"{server}/v1/models/tiny/versions/{quote(version)}/metadata", headers=AUTH).status_code == 400


def test_deep_json_is_400_and_the_connection_stays_usable(server):
    conn = connection(server)
    deep = '{"instances": ' + "[" * 5000 + "]" * 5000 + "}"
    conn.request("POST", "/v1/models/tiny:predict", body=deep, headers={**AUTH, "Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 400 and "nested too deeply" in json.loads(r.read())["error"]
    conn.request("POST", "/v1/models/tiny:predict", body=json.dumps(TENSOR), headers=AUTH)
    assert conn.getresponse().status == 200
    conn.close()


def test_an_unexpected_error_is_json_500_and_keeps_the_connection(server, monkeypatch):
    from covid_cxr.serve.routes import tf_serving

    def boom(*a, **k):
        raise RuntimeError("bug at /srv/secret/path.py")

    monkeypatch.setattr(tf_serving, "parse_signed_predict", boom)
    conn = connection(server)
    conn.request("POST", "/v1/models/tiny:predict", body=json.dumps(TENSOR), headers=AUTH)
    r = conn.getresponse()
    body = r.read()
    assert r.status == 500 and r.getheader("content-type") == "application/json"
    assert b"secret" not in body and "error" in json.loads(body)
    conn.request("GET", "/healthz")  # same socket: before the fix, the server had dropped it
    assert conn.getresponse().status == 200
    conn.close()


# ---------------------------------------------------------------------------------- 11. smaller findings

def test_head_index_and_lowercase_bearer(server):
    assert requests.head(f"{server}/").status_code == 200
    r = requests.post(f"{server}/v1/models/tiny:predict", json=TENSOR, headers={"Authorization": f"bearer {KEY}"})
    assert r.status_code == 200  # RFC 6750/7235: the scheme is case-insensitive
    r = requests.post(f"{server}/v1/models/tiny:predict", json=TENSOR, headers={"Authorization": "Bearer K3Y"})
    assert r.status_code == 401  # the token is not


def test_upload_with_two_files_is_400(server):
    img = png(np.zeros((64, 64), np.uint8))
    files = [("file", ("a.png", img, "image/png")), ("file", ("b.png", img, "image/png"))]
    r = requests.post(f"{server}/api/v1/predict", files=files, headers=AUTH)
    assert r.status_code == 400 and "exactly one file" in r.json()["error"]
    r = requests.post(f"{server}/api/v1/predict", files=files[:1], headers=AUTH)
    assert r.status_code == 200


def test_tensor_values_outside_0_1_are_400(server):
    for bad in (255.0, -0.5):
        r = requests.post(f"{server}/v1/models/tiny:predict", json={"instances": [[[bad] * 64] * 64]}, headers=AUTH)
        assert r.status_code == 400 and "[0, 1]" in r.json()["error"]
        oip = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 64, 64, 1], "data": [bad] * 4096}]}
        r = requests.post(f"{server}/v2/models/tiny/infer", json=oip, headers=AUTH)
        assert r.status_code == 400 and "[0, 1]" in r.json()["error"]
