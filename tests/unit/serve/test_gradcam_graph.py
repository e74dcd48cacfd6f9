"""The server explains through cam.onnx: a Grad-CAM upload through a real server never imports
torch, and a bundle without cam.onnx answers its prediction with a clear reason for the missing map."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import base64, io, json, sys
import httpx, numpy as np
from PIL import Image
from covid_cxr.serve.settings import ServeSettings
from covid_cxr.serve.testing import running_server

models = sys.argv[1]
buf = io.BytesIO()
Image.fromarray((np.random.default_rng(0).random((80, 80)) * 255).astype(np.uint8)).save(buf, format="PNG")
with running_server(ServeSettings(models=models, intra_op_threads=1)) as base:
    r = httpx.post(base + "/api/v1/predict?gradcam=true", files={"file": ("x.png", buf.getvalue())}, timeout=120)
body = r.json()
png = body.get("gradcam_png")
size = Image.open(io.BytesIO(base64.b64decode(png))).size if png else None
print(json.dumps({"status": r.status_code, "torch": "torch" in sys.modules, "size": size,
                  "error": body.get("gradcam_error"), "answer": body.get("label") or body.get("probabilities")}))  # no label for an OOD image
"""


def serve_once(models) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(models)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_gradcam_upload_without_torch(tiny_models):
    got = serve_once(tiny_models)
    assert got["status"] == 200 and got["answer"] and got["error"] is None
    assert got["size"] == [64, 64]  # the overlay came back, at the model's input size
    assert got["torch"] is False


@pytest.mark.slow  # torch Grad-CAM in a server process, twice
@pytest.mark.parametrize("damage", ["no cam", "broken cam"])
def test_gradcam_upload_of_a_bundle_without_cam(bundle_copy, damage):
    if damage == "no cam":
        meta = json.loads((bundle_copy / "metadata.json").read_text())
        meta.pop("cam")
        (bundle_copy / "metadata.json").write_text(json.dumps(meta))
        (bundle_copy / "cam.onnx").unlink()
    else:
        (bundle_copy / "cam.onnx").write_bytes(b"not an onnx file")
    got = serve_once(bundle_copy.parent.parent)
    assert got["status"] == 200 and got["answer"] and got["size"] is None  # the prediction stands
    assert got["torch"] is False  # no silent fallback to a torch model
    want = "no Grad-CAM output .*add-cam" if damage == "no cam" else "cam.onnx: ONNX Runtime cannot load it"
    assert __import__("re").search(want, got["error"]), got["error"]
    assert "/tmp" not in got["error"]  # no server paths leak
