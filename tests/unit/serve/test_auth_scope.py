"""Which routes need the API key (issue 17, item 12): liveness and readiness stay open for probes;
predict/infer always need it; model lists, metadata (with test metrics), Triton config and v2
metadata need it under the default scope 'all'; /metrics too unless `public_metrics`."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from covid_cxr.serve.app import create_app
from covid_cxr.serve.settings import ServeSettings

KEY = "k3y"
AUTH = {"Authorization": f"Bearer {KEY}"}
OPEN = ["/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/v2", "/v1/models/tiny",
        "/v1/models/tiny/versions/1", "/v2/models/tiny/ready", "/v2/models/tiny/versions/1/ready", "/"]
DESCRIBE = ["/api/v1/models", "/v1/models/tiny/metadata", "/v1/models/tiny/versions/1/metadata",
            "/v2/models/tiny", "/v2/models/tiny/versions/1", "/v2/models/tiny/config",
            "/v2/models/tiny/versions/1/config"]
TENSOR = {"instances": [[[0.5] * 64] * 64]}


def _client(tiny_models, **kw) -> TestClient:
    return TestClient(create_app(ServeSettings(models=tiny_models, api_key=KEY, **kw)))


def _ready(client: TestClient) -> None:
    for _ in range(600):
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("no model loaded")


@pytest.mark.parametrize("scope, public_metrics", [("all", False), ("all", True), ("predict", False)])
def test_routes_need_the_key_as_the_settings_say(tiny_models, scope, public_metrics):
    with _client(tiny_models, api_key_scope=scope, public_metrics=public_metrics) as client:
        _ready(client)
        for path in OPEN:
            assert client.get(path).status_code == 200, path
        for path in DESCRIBE:
            want = 401 if scope == "all" else 200
            r = client.get(path)
            assert r.status_code == want, (path, r.text)
            assert client.get(path, headers=AUTH).status_code == 200, path
            if want == 401:
                assert r.json() == {"error": "missing or wrong API key: send 'Authorization: Bearer <key>'"}
        metrics_open = public_metrics or scope == "predict"
        assert client.get("/metrics").status_code == (200 if metrics_open else 401)
        assert client.get("/metrics", headers=AUTH).status_code == 200
        for path in ("/v1/models/tiny:predict",):
            assert client.post(path, json=TENSOR).status_code == 401
            assert client.post(path, json=TENSOR, headers=AUTH).status_code == 200
        v2 = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 64, 64, 1], "data": [0.5] * 4096}]}
        assert client.post("/v2/models/tiny/infer", json=v2).status_code == 401
        assert client.post("/v2/models/tiny/infer", json=v2, headers=AUTH).status_code == 200


def test_scope_is_validated():
    with pytest.raises(ValueError):
        ServeSettings(models=".", api_key=KEY, api_key_scope="none")
