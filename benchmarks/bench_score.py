"""`covid-cxr score` throughput (issue 20): single-process score vs bare ONNX Runtime on the same
images, and Ray Data with 1 vs 2 single-thread workers.

Bare ONNX Runtime = decode + resize + one session.run per 64 images, nothing else (no gate labels,
no Parquet, no resuming): the ceiling that `score` adds its bookkeeping to. Every variant reads the
same N images (listed in a manifest; the files are read once first, so the page cache is warm for
all). Ray's cluster is started before its timings (a cluster is started once per job; its workers'
start, bundle loading included, is timed). Targets: score >= 90 % of bare ONNX Runtime; two Ray
workers >= 1.6x one.

Usage: python benchmarks/bench_score.py --model MODELS/efficientnet_lite0 [--data DIR] [--n 300] [--threads 1]
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "covid19-radiography"


def pick_images(data: Path, n: int) -> list[Path]:
    """n images spread over the class folders (every k-th file of the sorted list)."""
    files = sorted(p for p in data.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".dcm"})
    step = max(1, len(files) // n)
    return files[::step][:n]


def bare_onnxruntime(model: Path, files: list[Path], threads: int) -> float:
    """Images per second: decode, resize, session.run in batches of 64."""
    from covid_cxr.bundle import load_bundle
    from covid_cxr.bundle.reader import open_checked_session
    from covid_cxr.bundle.schema import ONNX_INPUT
    from covid_cxr.data.decode import load_for_model

    b = load_bundle(model)
    session = open_checked_session(b, threads, spinning=False)
    names = [t.name for t in b.metadata.onnx.outputs]
    h, w = b.input_hw
    t0 = time.perf_counter()
    for start in range(0, len(files), 64):
        x = np.stack([load_for_model(f, h, w) for f in files[start:start + 64]])[..., None]
        session.run(names, {ONNX_INPUT: x})
    return len(files) / (time.perf_counter() - t0)


def timed_score(model: Path, manifest: Path, out: Path, **kw) -> float:
    from covid_cxr.score import score_archive

    t0 = time.perf_counter()
    s = score_archive(model, manifest, out, **kw)
    assert s.scored == s.total and s.errors == 0, s
    return s.scored / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per process / Ray worker")
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args()
    files = pick_images(args.data, args.n)
    for f in files:
        f.read_bytes()  # warm the page cache for every variant alike
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "images.csv"
        with open(manifest, "w", newline="") as fh:
            csv.writer(fh).writerows([["path"], *([str(f.resolve())] for f in files)])
        rows = {"bare ONNX Runtime, 1 process": bare_onnxruntime(args.model, files, args.threads),
                "score, 1 process": timed_score(args.model, manifest, Path(tmp) / "one", threads=args.threads)}
        if not args.no_ray:
            from covid_cxr.score.on_ray import start_ray

            start_ray("local", 2 * args.threads)
            for workers in (1, 2):
                rows[f"score --ray, {workers} worker(s)"] = timed_score(
                    args.model, manifest, Path(tmp) / f"ray{workers}", ray="local", workers=workers,
                    threads=args.threads)
    print(f"{len(files)} images, {args.threads} ONNX Runtime thread(s) per process/worker, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for name, rate in rows.items():
        print(f"  {name:<34} {rate:7.1f} images/s")
    base = rows["bare ONNX Runtime, 1 process"]
    print(f"score / bare ONNX Runtime: {rows['score, 1 process'] / base:.2f} (target >= 0.90)")
    if not args.no_ray:
        one, two = rows["score --ray, 1 worker(s)"], rows["score --ray, 2 worker(s)"]
        print(f"Ray 2 workers / 1 worker: {two / one:.2f} (target >= 1.6)")


if __name__ == "__main__":
    main()
