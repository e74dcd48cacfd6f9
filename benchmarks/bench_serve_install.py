"""The torch-free serving install, measured: a fresh venv with `pip install .[serve]` (pinned by
requirements.lock, as deploy/Dockerfile installs it) beside a full one (`.[serve,train,explain]`).
The serve venv must hold no torch, run `covid-cxr serve` and answer an upload from a real bundle.
Prints one JSON object (docs/results/serving.md quotes it).

  python benchmarks/bench_serve_install.py [--serve-venv DIR] [--full-venv DIR] [--models MODELS]
      [--image PNG] [--json FILE]

A venv folder that already has bin/python is measured as it is (not reinstalled). Without --models a
tiny bundle (random weights, 64 px, synthetic data) is trained with this interpreter, which needs [train].
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from covid_cxr.core.files import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
TORCH_SIDE = ("torch", "torchvision", "lightning", "timm", "pytorch_grad_cam", "segmentation_models_pytorch")


def make_venv(venv: Path, extras: str) -> float | None:
    """Create VENV with `pip install -c requirements.lock .[EXTRAS]`; seconds taken (None: reused)."""
    if (venv / "bin" / "python").exists():
        return None
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-c", str(REPO / "requirements.lock"),
                    f"{REPO}[{extras}]"], check=True, cwd=tempfile.gettempdir())
    return round(time.perf_counter() - t0, 1)


def installed(venv: Path) -> dict:
    """Installed size of site-packages (MiB), distributions, and which torch-side modules exist."""
    (site,) = (venv / "lib").glob("python3*/site-packages")
    size = sum(f.stat().st_size for f in site.rglob("*") if f.is_file() and not f.is_symlink())
    probe = "import importlib.util as u, json, sys; print(json.dumps([m for m in sys.argv[1:] if u.find_spec(m)]))"
    found = subprocess.run([str(venv / "bin" / "python"), "-c", probe, *TORCH_SIDE], capture_output=True,
                           text=True, check=True).stdout
    return {"site_packages_mib": round(size / 2**20, 1), "distributions": len(list(site.glob("*.dist-info"))),
            "torch_side_modules": json.loads(found)}


def tiny_models(root: Path) -> Path:
    """MODELS/tiny/1: a 2-epoch efficientnet_lite0 with random weights on generated 64 px images."""
    from covid_cxr.data.synthetic import make_synthetic_dataset
    from covid_cxr.train.fit import TrainConfig, train

    data = make_synthetic_dataset(root / "data", per_class=12, size=64)
    cfg = TrainConfig(weights="none", image_size=64, epochs=2, lr_find=False, progress=False, name="tiny")
    train(data, root / "models", cfg, workdir=root / "work")
    return root / "models"


def _post_image(url: str, png: bytes) -> dict:
    """POST one PNG as multipart/form-data (stdlib only) and return the JSON answer."""
    b = uuid.uuid4().hex
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{b}--\r\n".encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": f"multipart/form-data; boundary={b}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def serve_smoke(venv: Path, models: Path, image: Path, port: int = 18931) -> dict:
    """Run `covid-cxr serve` from VENV, wait for /readyz, upload IMAGE; the answer and the start time."""
    cmd = [str(venv / "bin" / "covid-cxr"), "serve", "--models", str(models), "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"error: the [serve] server exited:\n{proc.stdout.read()}")
            try:
                if urllib.request.urlopen(base + "/readyz", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.2)
            if time.perf_counter() - t0 > 180:
                raise SystemExit("error: the [serve] server was not ready in 180 s")
        ready_s = round(time.perf_counter() - t0, 1)
        answer = _post_image(base + "/api/v1/predict", image.read_bytes())
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"ready_s": ready_s, "label": answer.get("label"), "probabilities": answer.get("probabilities")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve-venv", type=Path, default=Path(tempfile.gettempdir()) / "covid-cxr-serve-venv")
    ap.add_argument("--full-venv", type=Path, default=None, help="also measure this full install")
    ap.add_argument("--models", type=Path, default=None)
    ap.add_argument("--image", type=Path, default=None, help="a PNG to upload (default: a generated one)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    out = {"serve": {"install_s": make_venv(a.serve_venv, "serve"), **installed(a.serve_venv)}}
    if a.full_venv:
        out["full"] = {"install_s": make_venv(a.full_venv, "serve,train,explain"), **installed(a.full_venv)}
    with tempfile.TemporaryDirectory() as tmp:
        models = a.models or tiny_models(Path(tmp))
        image = a.image or next((models.parent / "data").rglob("*.png"))
        out["serve"]["smoke"] = serve_smoke(a.serve_venv, models, image)
    print(json.dumps(out, indent=1))
    if a.json:
        atomic_write_json(a.json, out)


if __name__ == "__main__":
    main()
