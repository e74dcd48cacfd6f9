"""Clients cannot choose Prometheus labels (issue 17, item 5): a request naming a model the
repository does not hold is counted under one fixed label, so /metrics stays small whatever names
arrive; requests to a served model keep their own label."""

from __future__ import annotations

import secrets

import pytest
import requests

from covid_cxr.serve.repository import UNKNOWN_MODEL
from covid_cxr.serve.settings import ServeSettings
from covid_cxr.serve.testing import running_server


@pytest.mark.slow  # hundreds of requests through a live server
def test_random_model_names_do_not_grow_metrics(tiny_models):
    with running_server(ServeSettings(models=tiny_models)) as base, requests.Session() as s:
        for _ in range(500):
            name = secrets.token_hex(32)  # 64 characters, a valid model name, no such model
            assert s.get(f"{base}/v1/models/{name}").status_code == 404
        for _ in range(3):
            assert s.get(f"{base}/v1/models/tiny").status_code == 200
        assert s.get(f"{base}/v1/models/bad%20name").status_code == 400
        text = s.get(f"{base}/metrics").text
    assert len(text) < 100_000, f"/metrics is {len(text)} bytes"  # unfixed: ~1 MB
    assert f'endpoint="tfs_status",model="{UNKNOWN_MODEL}",status="404"}} 500.0' in text
    assert 'endpoint="tfs_status",model="tiny",status="200"} 3.0' in text
