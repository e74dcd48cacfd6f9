"""Grad-CAM from the graph (cam.onnx) against pytorch-grad-cam, and the server's memory with each.

    python benchmarks/bench_camgraph.py parity --models MODELS/<name> --data DATASET [--n 48]
    python benchmarks/bench_camgraph.py memory --models MODELS --src SRC [--port 8765]

parity: every class's map from cam.onnx (ONNX Runtime) vs pytorch-grad-cam's GradCAM on the
bundle's torch model, over --n real X-rays taken evenly from the dataset's class folders: max and
99th-percentile |difference| (maps in [0, 1]), the peak's agreement, seconds per image for each.
memory: starts `python -m covid_cxr serve` from SRC (a checkout's src/), sends three
`?gradcam=true` uploads and prints the server's RSS after load and settled after the uploads
(and whether the uploads carried an overlay). Run it on a tree before and after cam.onnx.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from covid_cxr.models.loading import load_torch


def xrays(data: Path, n: int) -> list[Path]:
    files = sorted(p for d in sorted(data.iterdir()) if d.is_dir() for p in d.glob("*.png"))
    return [files[i] for i in np.linspace(0, len(files) - 1, n).astype(int)]


def parity(models: Path, data: Path, n: int) -> None:
    from covid_cxr.bundle import load_bundle
    from covid_cxr.data.decode import load_for_model
    from covid_cxr.explain.gradcam import Explainer
    from covid_cxr.explain.render import GraphExplainer

    bundle = load_bundle(models)
    x = np.stack([bundle.prepare(load_for_model(f, *bundle.input_hw)[None])[0] for f in xrays(data, n)])
    graph, torch_cam = GraphExplainer(bundle), Explainer(load_torch(bundle), temperature=bundle.temperature)
    diffs, peaks, t_graph, t_torch = [], [], 0.0, 0.0
    for c in range(len(bundle.classes)):
        t0 = time.perf_counter()
        got = [graph.explain(img, c)[0].cam for img in x]
        t1 = time.perf_counter()
        want = [torch_cam.explain(img, c)[0].cam for img in x]
        t_graph, t_torch = t_graph + t1 - t0, t_torch + time.perf_counter() - t1
        diffs += [np.abs(g - w).ravel() for g, w in zip(got, want)]
        peaks += [np.unravel_index(g.argmax(), g.shape) == np.unravel_index(w.argmax(), w.shape)
                  for g, w in zip(got, want)]
    d = np.concatenate(diffs)
    k = len(x) * len(bundle.classes)
    print(f"{bundle.name} v{bundle.version} ({bundle.metadata.architecture.name}, {bundle.input_hw[0]} px): "
          f"{len(x)} X-rays x {len(bundle.classes)} classes")
    print(f"max |d| {d.max():.2e}  p99 {np.quantile(d, 0.99):.2e}  mean {d.mean():.2e}  "
          f"same peak pixel {np.mean(peaks):.3f}")
    print(f"s/map: cam.onnx {t_graph / k:.3f}  pytorch-grad-cam {t_torch / k:.3f}")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory(models: Path, src: Path, port: int, image: Path) -> None:
    import httpx

    env = {**os.environ, "PYTHONPATH": str(src.resolve())}
    proc = subprocess.Popen([sys.executable, "-m", "covid_cxr", "serve", "--models", str(models), "--port", str(port),
                             "--intra-op-threads", "2", "--log-level", "warning"], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(3000):  # up to 10 min on a loaded machine
            if proc.poll() is not None:
                raise SystemExit(f"the server exited ({proc.returncode})")
            try:
                if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        time.sleep(3)
        loaded = rss_mib(proc.pid)
        ok = []
        for _ in range(3):
            r = httpx.post(base + "/api/v1/predict?gradcam=true", files={"file": image.open("rb")}, timeout=300)
            ok.append(r.status_code == 200 and "gradcam_png" in r.json())
        time.sleep(10)
        print(f"src {src}: RSS loaded {loaded:.0f} MiB, settled after 3 Grad-CAM uploads {rss_mib(proc.pid):.0f} MiB, "
              f"overlays {sum(ok)}/3")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["parity", "memory"])
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/covid19-radiography"))
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--src", type=Path, default=Path("src"))
    ap.add_argument("--port", type=int, default=8765)
    a = ap.parse_args()
    if a.what == "parity":
        parity(a.models, a.data, a.n)
    else:
        memory(a.models, a.src, a.port, xrays(a.data, 1)[0])


if __name__ == "__main__":
    main()
