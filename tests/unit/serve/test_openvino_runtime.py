"""`covid-cxr serve --runtime openvino [--precision P]` through the real HTTP server on loopback:
an accepted variant answers as fp32 does (closely), one never measured is unavailable with the
reason and the command; the CLI itself refuses a precision ONNX Runtime lacks before it starts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import requests

from covid_cxr.bundle import load_bundle
from covid_cxr.serve.settings import ServeSettings
from covid_cxr.serve.testing import free_port, running_server

pytest.importorskip("openvino")
SRC = Path(__file__).resolve().parents[3] / "src"


def smooth(n: int) -> np.ndarray:
    from covid_cxr.publish.writer import smooth_images

    return smooth_images(n, 64, 64, seed=3)


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory) -> Path:
    """MODELS with tiny v1 and v2 = v1 + its accepted bf16 measurement."""
    from covid_cxr.publish.precision import add_precision

    out = tmp_path_factory.mktemp("ov-serve") / "models"
    shutil.copytree(tiny_models / "tiny" / "1", out / "tiny" / "1")
    assert add_precision(out / "tiny", "bf16").metadata.precision_variants["bf16"].accepted
    return out


def predict(base: str, x: np.ndarray) -> requests.Response:
    return requests.post(f"{base}/v1/models/tiny:predict", json={"instances": x[..., None].tolist()}, timeout=30)


def test_an_accepted_bf16_variant_serves_over_http(models):
    x = smooth(4)
    want = load_bundle(models / "tiny").predict(x)
    with running_server(ServeSettings(models=models, runtime="openvino", precision="bf16", rescan_seconds=0.5)) as base:
        r = predict(base, x)
        assert r.status_code == 200, r.text
        got = np.array(r.json()["predictions"])
        assert got.shape == (4, 3) and np.abs(got - want).max() < 5e-3 and (got.argmax(1) == want.argmax(1)).all()
        variant = load_bundle(models / "tiny", runtime="openvino", precision="bf16").predict(x)
        assert np.abs(got - variant).max() < 1e-6  # what the server ran: OpenVINO at bf16, not ONNX Runtime
        assert requests.get(f"{base}/v1/models/tiny", timeout=10).json()["model_version_status"][0]["version"] == "2"


def test_an_unmeasured_variant_is_unavailable_with_the_reason(models):
    settings = ServeSettings(models=models, runtime="openvino", precision="int8", rescan_seconds=0.5)
    with running_server(settings, wait_ready=False) as base:
        r = predict(base, smooth(1))
        assert r.status_code == 503
        msg = r.json()["error"]
        assert "int8 was never measured" in msg and "covid-cxr bundle precision MODELS/tiny --precision int8" in msg


def test_the_cli_serves_with_openvino(models):
    """The command line as an operator types it: a real process, a real port."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    cmd = [sys.executable, "-c", "from covid_cxr.cli import app; app()", "serve", "--models", str(models),
           "--port", str(port), "--runtime", "openvino", "--precision", "bf16", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server not ready in 120 s"
            time.sleep(0.2)
        r = predict(base, smooth(2))
        assert r.status_code == 200 and np.array(r.json()["predictions"]).shape == (2, 3)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_the_cli_refuses_a_lower_precision_on_onnx_runtime(models):
    from typer.testing import CliRunner

    from covid_cxr.cli import app

    r = CliRunner().invoke(app, ["serve", "--models", str(models), "--precision", "bf16"])
    assert r.exit_code == 2 and "runs on OpenVINO only: add --runtime openvino" in r.output
    r = CliRunner().invoke(app, ["serve", "--models", str(models), "--runtime", "tensorrt"])
    assert r.exit_code == 2 and "--runtime" in r.output
