"""`covid-cxr export --backend python`: the repository a python-backend Triton loads, and the real
tritonserver of the nvidia-pytriton wheel (CPU-only, python backend alone) answering tritonclient
with our own server's probabilities."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import requests
from typer.testing import CliRunner

from covid_cxr.cli import app
from covid_cxr.data.decode import load_for_model

mc = pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import text_format  # noqa: E402


def test_python_variant_layout_and_config(tiny_models, tmp_path):
    repo = tmp_path / "repo"
    r = CliRunner().invoke(app, ["export", "--models", str(tiny_models), "--out", str(repo), "--backend", "python"])
    assert r.exit_code == 0, r.output
    tree = sorted(str(p.relative_to(repo)) for p in repo.rglob("*"))
    assert tree == ["tiny", "tiny/1", "tiny/1/model.onnx", "tiny/1/model.py", "tiny/config.pbtxt", "tiny/labels.txt"]
    cfg = text_format.Parse((repo / "tiny" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert cfg.backend == "python" and cfg.platform == "" and cfg.max_batch_size == 64
    assert [g.kind for g in cfg.instance_group] == [mc.ModelInstanceGroup.Kind.KIND_CPU]
    bad = CliRunner().invoke(app, ["export", "--models", str(tiny_models), "--out", str(tmp_path / "r2"),
                                   "--backend", "tensorrt"])
    assert bad.exit_code == 2 and "onnxruntime, python" in bad.output and not (tmp_path / "r2").exists()


def _triton_dist() -> tuple[Path, Path, Path]:
    """(tritonserver binary, its shared libraries, the python backend stub for this Python) from the
    nvidia-pytriton wheel; skips (with the reason) where the wheel or its stub is missing."""
    pytriton = pytest.importorskip("pytriton", reason="the nvidia-pytriton wheel (tritonserver binary) is not "
                                   "installed: pip install -e '.[test]'")
    dist = Path(pytriton.__file__).parent / "tritonserver"
    stub = dist / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / "triton_python_backend_stub"
    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    if not (dist / "bin" / "tritonserver").is_file() or not stub.is_file():
        pytest.skip(f"nvidia-pytriton has no tritonserver or no python backend stub for Python {sys.version_info[:2]}")
    return dist / "bin" / "tritonserver", libs, stub


@contextmanager
def tritonserver(repo: Path, work: Path):
    """A real tritonserver on loopback (free ports) serving `repo`; yields its HTTP address."""
    from covid_cxr.serve.testing import free_port

    binary, libs, stub = _triton_dist()
    backends = work / "backends" / "python"  # the wheel's python backend with this Python's stub beside it
    backends.mkdir(parents=True)
    for f in (binary.parents[1] / "backends" / "python").iterdir():
        if f.is_file():
            os.symlink(f, backends / f.name)
    shutil.copy(stub, backends / "triton_python_backend_stub")
    http, grpc, metrics = free_port(), free_port(), free_port()
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join(filter(None, [str(libs), os.environ.get("LD_LIBRARY_PATH")])),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # the stub's Python: this venv's
    log = open(work / "tritonserver.log", "wb")
    proc = subprocess.Popen([str(binary), f"--model-repository={repo}", f"--backend-directory={backends.parent}",
                             "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", f"--http-port={http}",
                             f"--grpc-port={grpc}", f"--metrics-port={metrics}", "--allow-metrics=false",
                             "--exit-on-error=true"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 120
        while not _ready(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("tritonserver did not become ready:\n" + (work / "tritonserver.log").read_text()[-3000:])
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _ready(url: str) -> bool:
    try:
        return requests.get(f"http://{url}/v2/health/ready", timeout=2).status_code == 200
    except requests.RequestException:
        return False


@pytest.mark.slow
def test_real_tritonserver_answers_as_our_server(tiny_models, tiny_data, tmp_path):
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    from covid_cxr.serve.settings import ServeSettings
    from covid_cxr.serve.testing import running_server

    repo = tmp_path / "repo"
    r = CliRunner().invoke(app, ["export", "--models", str(tiny_models), "--out", str(repo), "--backend", "python"])
    assert r.exit_code == 0, r.output
    real = np.stack([load_for_model(p, 64, 64) for p in sorted(tiny_data.rglob("*.png"))[::5]])
    noise = np.random.default_rng(0).random((2, 64, 64), dtype=np.float32)
    x = np.concatenate([real, noise])[..., None].astype(np.float32)
    with running_server(ServeSettings(models=tiny_models)) as ours:
        body = {"signature_name": "with_ood", "instances": x.tolist()}
        rows = requests.post(f"{ours}/v1/models/tiny:predict", json=body, timeout=60).json()["predictions"]
    want_p = np.array([row["probabilities"] for row in rows])
    want_s = np.array([row["ood_score"] for row in rows])
    with tritonserver(repo, tmp_path / "triton") as url:
        client = th.InferenceServerClient(url)
        assert client.is_model_ready("tiny") and client.get_model_metadata("tiny")["platform"] == "python"
        answers = []
        for batch in (x[:1], x[1:]):  # one image, then a batch
            inp = th.InferInput("image", list(batch.shape), "FP32")
            inp.set_data_from_numpy(batch)
            answers.append(client.infer("tiny", [inp]))
        wrong = th.InferInput("image", [1, 32, 32, 1], "FP32")
        wrong.set_data_from_numpy(np.zeros((1, 32, 32, 1), np.float32))
        with pytest.raises(InferenceServerException, match="unexpected shape"):
            client.infer("tiny", [wrong])  # Triton refuses what the config does not declare
    got_p = np.concatenate([a.as_numpy("probabilities") for a in answers])
    got_s = np.concatenate([a.as_numpy("ood_score").ravel() for a in answers])
    assert got_p.shape == want_p.shape == (len(x), 3)
    assert np.abs(got_p - want_p).max() <= 1e-5
    assert np.abs(got_s - want_s).max() <= 1e-5 * max(1.0, np.abs(want_s).max())
    assert len(set(np.round(got_p[:, 0], 6))) > 1  # distinct images got distinct answers (no stride-0 inputs)
