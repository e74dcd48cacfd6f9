"""The server runs without torch (what the `[serve]` install and deploy/Dockerfile rely on), counting
imports made inside functions: a fresh interpreter whose import system refuses torch-side packages
loads a real bundle and answers an upload; the same refusal stops the training code, so it bites."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

TORCH_SIDE = "torch,torchvision,lightning,timm,pytorch_grad_cam,segmentation_models_pytorch"

BLOCKER = """
import importlib.abc, sys
BLOCK = set(sys.argv[1].split(","))
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in BLOCK:
            raise ImportError(f"torch-side import {name!r}")
sys.meta_path.insert(0, Refuse())
"""

SERVE = BLOCKER + """
import json
from pathlib import Path
import httpx
from covid_cxr.serve.settings import ServeSettings
from covid_cxr.serve.testing import running_server
with running_server(ServeSettings(models=Path(sys.argv[2]))) as base:
    files = {"file": ("x.png", Path(sys.argv[3]).read_bytes(), "image/png")}
    r = httpx.post(base + "/api/v1/predict?model=tiny", timeout=60, files=files)
    cam = httpx.post(base + "/api/v1/predict?model=tiny&gradcam=true", timeout=60, files=files)
print(json.dumps({"status": r.status_code, "body": r.json(), "cam": [cam.status_code, cam.json()],
                  "loaded": sorted(m for m in sys.modules if m.partition(".")[0] in BLOCK)}))
"""


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, TORCH_SIDE, *args], capture_output=True, text=True,
                          timeout=300)


def test_the_server_loads_a_bundle_and_predicts_with_torch_refused(tiny_models, tiny_data):
    image = next(tiny_data.rglob("*.png"))
    r = _run(SERVE, str(tiny_models), str(image))
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    body = out["body"]
    assert out["status"] == 200 and len(body["probabilities"]) == 3, out
    # a label exactly when the gate accepts the image (a rejected one gets none)
    assert body.get("label") in ({"COVID-19", "Normal", "Viral Pneumonia"} if body["in_distribution"] else {None})
    assert out["loaded"] == []
    # Grad-CAM comes from the bundle's cam.onnx: the map arrives with torch refused.
    status, cam = out["cam"]
    assert status == 200 and cam.get("gradcam_png") and not cam.get("gradcam_error"), cam


@pytest.mark.parametrize("module", ["covid_cxr.train.fit", "covid_cxr.explain.gradcam"])
def test_the_refusal_stops_torch_side_code(module):
    r = _run(BLOCKER + f"import {module}")
    assert r.returncode != 0 and "torch-side import" in r.stderr
