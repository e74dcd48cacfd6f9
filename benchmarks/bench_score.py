"""`covid-cxr score` throughput (issue 20): single-process score vs bare ONNX Runtime on the same
images, and Ray Data with 1 vs 2 single-thread workers.

Bare ONNX Runtime = decode + resize + one session.run per 64 images, nothing else (no gate labels,
no Parquet, no resuming): the ceiling that `score` adds its bookkeeping to. Every variant reads the
same N images (listed in a manifest; the files are read once first, so the page cache is warm for
all). Ray's cluster is started before its timings (a cluster is started once per job; its workers'
start, bundle loading included, is timed). Each variant also reports its rate after the first rows
came back (parts of 64 rows: start-up left out, what an archive of 100,000 images runs at), that
start-up, and the driver's CPU seconds (taken from the workers' cores). Targets: score >= 90 % of
bare ONNX Runtime; two Ray workers >= 1.6x one.

Usage: python benchmarks/bench_score.py --model MODELS/efficientnet_lite0 [--data DIR] [--n 300] [--threads 1]
       [--json FILE]
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
ENGINES = ("data", "actors")  # score/on_ray.py: Ray Data map_batches, or Ray Core actors fed by the driver
SYSTEM = ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py")  # Ray's own processes
PART_ROWS = 64  # one ONNX Runtime batch per part: the first rows come back early, so start-up shows


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


def ray_system_cpu() -> float:
    """CPU seconds used so far by Ray's own processes on this machine (raylet, GCS, monitors): with
    the driver's, what a Ray run takes from the workers' cores."""
    import psutil

    total = 0.0
    for p in psutil.process_iter(["cmdline", "cpu_times"]):
        cmd, t = " ".join(p.info["cmdline"] or []), p.info["cpu_times"]
        if t is not None and "ray::" not in cmd and any(k in cmd for k in SYSTEM):
            total += t.user + t.system
    return total


def timed_score(model: Path, manifest: Path, out: Path, **kw) -> dict:
    """End-to-end images/s (start-up included), images/s after the first rows came back (what a long
    archive runs at), that start-up, and the CPU seconds of the driver and of Ray's own processes per
    image (what they take from the workers' cores; load-independent, unlike the rates)."""
    from covid_cxr.score import score_archive

    ray_on = kw.get("ray") is not None
    t0, cpu0, sys0 = time.perf_counter(), time.process_time(), ray_system_cpu() if ray_on else 0.0
    s = score_archive(model, manifest, out, part_rows=PART_ROWS, **kw)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    system = ray_system_cpu() - sys0 if ray_on else 0.0
    assert s.scored == s.total and s.errors == 0, s
    return {"rate": s.scored / wall, "steady": s.steady_rate, "first_s": s.first[0],
            "driver_cpu_ms_per_image": 1000 * cpu / s.scored, "ray_system_cpu_ms_per_image": 1000 * system / s.scored}


def ray_variants(model: Path, manifest: Path, warm: Path, tmp: Path, threads: int) -> dict:
    """1 and 2 workers on each engine, after one untimed run of each (first-use imports and
    Ray Data's planning code are paid once per process, not by whichever variant runs first)."""
    from covid_cxr.score import on_ray

    on_ray.start_ray("local", 2 * threads)
    rows = {}
    for engine in ENGINES:
        on_ray.ENGINE = engine
        timed_score(model, warm, tmp / f"warm-{engine}", ray="local", workers=1, threads=threads)
        for workers in (1, 2):
            rows[f"score --ray ({engine}), {workers} worker(s)"] = timed_score(
                model, manifest, tmp / f"ray-{engine}-{workers}", ray="local", workers=workers, threads=threads)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per process / Ray worker")
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    files = pick_images(args.data, args.n)
    for f in files:
        f.read_bytes()  # warm the page cache for every variant alike
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "images.csv"
        with open(manifest, "w", newline="") as fh:
            csv.writer(fh).writerows([["path"], *([str(f.resolve())] for f in files)])
        bare = bare_onnxruntime(args.model, files, args.threads)
        rows = {"bare ONNX Runtime, 1 process": {"rate": bare, "steady": bare, "first_s": 0.0}}
        rows["score, 1 process"] = timed_score(args.model, manifest, Path(tmp) / "one", threads=args.threads)
        if not args.no_ray:
            warm = Path(tmp) / "warm.csv"
            warm.write_text("path\n" + "".join(f"{f.resolve()}\n" for f in files[:8]))
            rows.update(ray_variants(args.model, manifest, warm, Path(tmp), args.threads))
    report(rows, args, len(files))


def report(rows: dict, args, n: int) -> None:
    load = os.getloadavg()[0]
    print(f"{n} images, {args.threads} ONNX Runtime thread(s) per process/worker, parts of {PART_ROWS} rows, "
          f"load average {load:.1f} on {os.cpu_count()} CPUs")
    print(f"  {'variant':<34} {'images/s':>8} {'after start':>11} {'start s':>7} {'driver ms/img':>13} "
          f"{'Ray sys ms/img':>14}")
    for name, r in rows.items():
        print(f"  {name:<34} {r['rate']:8.1f} {r['steady']:11.1f} {r['first_s']:7.1f} "
              f"{r.get('driver_cpu_ms_per_image', 0):13.1f} {r.get('ray_system_cpu_ms_per_image', 0):14.1f}")
    ratios = {"score / bare": rows["score, 1 process"]["rate"] / rows["bare ONNX Runtime, 1 process"]["rate"]}
    print(f"score / bare ONNX Runtime: {ratios['score / bare']:.2f} (target >= 0.90)")
    for engine in ([] if args.no_ray else ENGINES):
        one, two = rows[f"score --ray ({engine}), 1 worker(s)"], rows[f"score --ray ({engine}), 2 worker(s)"]
        ratios[f"ray {engine} 2/1"] = two["rate"] / one["rate"]
        ratios[f"ray {engine} 2/1 after start"] = two["steady"] / one["steady"]
        print(f"Ray ({engine}) 2 workers / 1 worker: {two['rate'] / one['rate']:.2f} end to end, "
              f"{two['steady'] / one['steady']:.2f} after the first rows (target >= 1.6)")
    if args.json:
        from covid_cxr.core.files import atomic_write_json

        atomic_write_json(args.json, {"images": n, "threads": args.threads, "load_average": load,
                                      "cpus": os.cpu_count(), "rows": rows, "ratios": ratios})


if __name__ == "__main__":
    main()
