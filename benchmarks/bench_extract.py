"""Frozen-feature extraction, PyTorch vs ONNX Runtime, side by side in one run on real X-rays.

Prints images/s (decode + resize included, as training pays them) for torch fp32 eager (contiguous),
torch fp32 channels-last (the path before ONNX Runtime) and ONNX Runtime fp32 (the default now),
the features' largest relative difference, and -- given a bundle trained on the same data -- how
many test-split predictions of its head change when its features come from ONNX Runtime.

Usage: python benchmarks/bench_extract.py [--data DIR] [--n 512] [--archs efficientnet_lite0,...]
                                          [--model MODELS/<name>]   # predictions changed on its test split
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from covid_cxr.data.decode import load_batch
from covid_cxr.models import create_model, get_spec
from covid_cxr.features.onnx import OnnxFeatureExtractor
from covid_cxr.models.loading import load_torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "covid19-radiography"


def rates(paths: list[Path], size: int, engines: dict, batch: int = 32) -> dict:
    """images/s and features per engine. Engines take turns batch by batch (decode+resize timed
    with each), so a shared machine's changing load falls on all of them alike."""
    spent = {k: 0.0 for k in engines}
    feats: dict[str, list] = {k: [] for k in engines}
    for fn in engines.values():
        fn(torch.from_numpy(load_batch(paths[:4], size, size))[:, None])  # warm-up
    for i in range(0, len(paths), batch):
        for name, fn in engines.items():
            t = time.perf_counter()
            feats[name].append(fn(torch.from_numpy(load_batch(paths[i:i + batch], size, size))[:, None]))
            spent[name] += time.perf_counter() - t
    return {k: (len(paths) / spent[k], torch.cat(feats[k])) for k in engines}


def engines(model, size: int, cache: Path) -> dict:
    def eager(x):
        with torch.inference_mode():
            return model.features(x)

    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def channels_last(x):
        with torch.inference_mode():
            return cl_model.features(x.contiguous(memory_format=torch.channels_last))

    t = time.perf_counter()
    ort = OnnxFeatureExtractor(model, size, cache)
    print(f"  (backbone export + session: {time.perf_counter() - t:.1f} s, once per arch/size/weights)")
    return {"torch fp32 eager": eager, "torch fp32 CL": channels_last, "ORT fp32": ort}


def bench(data: Path, archs: list[str], n: int) -> None:
    paths = sorted(data.glob("*/*.png"))[:: max(1, 4137 // n)][:n]
    print(f"== feature extraction, images/s: {len(paths)} real X-rays, batch 32, {torch.get_num_threads()} "
          "threads, decode+resize included")
    for arch in archs:
        size = get_spec(arch).input_size
        model, _ = create_model(arch, "imagenet" if arch.startswith("efficientnet") else "none")
        model.eval()
        with tempfile.TemporaryDirectory() as tmp:
            res = rates(paths, size, engines(model, size, Path(tmp)))
        base_rate, base = res["torch fp32 eager"]
        print(f"  {arch} ({size} px)")
        for name, (r, f) in res.items():
            rel = ((f - base).abs().max() / base.abs().max()).item()
            print(f"    {name:<18}{r:8.1f} img/s  {r / base_rate:5.2f}x  max|Δf|/max|f| {rel:.1e}")


def changed_predictions(model_dir: Path) -> None:
    """The bundle's head on torch features vs ONNX Runtime features of its own test split."""
    from covid_cxr.bundle import load_bundle
    from covid_cxr.data import prepare

    b = load_bundle(model_dir)
    cfg = b.metadata.training.config
    d = b.metadata.training.data
    prepared = prepare(d.dataset_root, cfg.classes, cfg.balance, cfg.max_per_class, cfg.seed, progress=False)
    assert abs(prepared.mean - b.metadata.input.normalisation.mean) < 1e-9, "not the bundle's split"
    model = load_torch(b)
    size = b.input_hw[0]
    paths = [prepared.manifest.root / r.path for r in prepared.splits["test"]]
    with tempfile.TemporaryDirectory() as tmp:
        fns = engines(model, size, Path(tmp))
        res = rates(paths, size, {k: fns[k] for k in ("torch fp32 eager", "ORT fp32")})
    (rt, ft), (ro, fo) = res["torch fp32 eager"], res["ORT fp32"]
    with torch.inference_mode():
        pt, po = torch.softmax(model.head(ft), 1), torch.softmax(model.head(fo), 1)
    changed = int((pt.argmax(1) != po.argmax(1)).sum())
    print(f"\n== {b.name} v{b.version}, its test split ({len(paths)} images): torch fp32 eager {rt:.1f} img/s, "
          f"ORT fp32 {ro:.1f} img/s ({ro / rt:.2f}x); predictions changed: {changed}; "
          f"max |Δp| {float((pt - po).abs().max()):.1e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--archs", default="efficientnet_lite0")
    ap.add_argument("--model", type=Path, help="a bundle trained on --data: count changed test predictions")
    a = ap.parse_args()
    bench(a.data, [s for s in a.archs.split(",") if s], a.n)
    if a.model:
        changed_predictions(a.model)


if __name__ == "__main__":
    main()
