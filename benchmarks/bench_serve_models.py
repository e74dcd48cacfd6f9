"""Several bundles through the real server, side by side (issue 19, item 5): teacher, student and a
plain lite0 at 224 px, each served alone by `covid-cxr serve` on loopback (micro-batching on, the
default), the same real PNG uploaded to /api/v1/predict. Per bundle: images/s at concurrency 1 and
32, p50/p99 latency, and the server's settled resident memory (VmRSS after the load) and peak.

Rounds alternate the bundles' order (the machine's load drifts); img/s is the median round's. The
ratios the serving target is stated in come last: student/teacher (>= 3x) and student/lite0-224
(>= 0.87x). Load generator, server start and memory readings: benchmarks/bench_serve.py.

    python benchmarks/bench_serve_models.py --bundle teacher=MODELS/accurate-teacher \\
        --bundle student=MODELS/accurate --bundle lite0-224=MODELS/lite0-224 [--json runs/serve-models.json]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serve  # noqa: E402  (the sibling benchmark: server, load generator, memory)

TARGETS = {("student", "teacher"): 3.0, ("student", "lite0-224"): 0.87}


def one_model_repo(tmp: Path, name: str, bundle) -> Path:
    """MODELS/<name>/1 -> the bundle's folder (a link): the server holds that bundle alone."""
    models = tmp / name
    (models / name).mkdir(parents=True)
    (models / name / "1").symlink_to(bundle.path.resolve(), target_is_directory=True)
    return models


def measure(bundles: dict, png: bytes, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-serve-models-") as tmp:
        repos = {k: one_model_repo(Path(tmp), k, b) for k, b in bundles.items()}
        rounds: dict[str, list[dict]] = {k: [] for k in bundles}
        for r in range(args.rounds):
            order = list(bundles) if r % 2 == 0 else list(reversed(bundles))
            for name in order:
                rounds[name].append(bench_serve.bench_server(repos[name], name, png, True, args))
                print(f"  round {r + 1}: {name} done; load average {os.getloadavg()[0]:.2f}", flush=True)
    return {k: bench_serve.merge(v) for k, v in rounds.items()}


def summary(runs: dict, concurrency: list[int]) -> dict:
    out = {}
    for name, run in runs.items():
        row = {"rss_mib": run["memory"]["VmRSS"] / 2**20, "peak_mib": run["memory"]["VmHWM"] / 2**20}
        for c in concurrency:
            ld = run["loads"][c]
            row[c] = {"img_s": ld.throughput, "p50_ms": ld.pct(0.5), "p99_ms": ld.pct(0.99),
                      "failed": len(ld.failures), "cpu_ms": ld.cpu_ms}
        out[name] = row
    return out


def print_table(rows: dict, concurrency: list[int]) -> dict:
    print(f"{'bundle':>10} | {'conc.':>5} | {'img/s':>7} | {'p50 ms':>7} | {'p99 ms':>7} | {'CPU ms/img':>10} | "
          f"{'RSS MiB':>7} | {'peak MiB':>8} | failed")
    print("-" * 96)
    for name, row in rows.items():
        for c in concurrency:
            r = row[c]
            print(f"{name:>10} | {c:>5} | {r['img_s']:7.1f} | {r['p50_ms']:7.1f} | {r['p99_ms']:7.1f} | "
                  f"{r['cpu_ms']:10.2f} | {row['rss_mib']:7.0f} | {row['peak_mib']:8.0f} | {r['failed']}")
    ratios = {}
    print()
    for (a, b), target in TARGETS.items():
        if a in rows and b in rows:
            for c in concurrency:
                x = rows[a][c]["img_s"] / rows[b][c]["img_s"]
                ratios[f"{a}/{b}@{c}"] = x
                print(f"{a}/{b} images/s at concurrency {c}: {x:.2f}x (target >= {target}x: "
                      f"{'met' if x >= target else 'NOT met'})")
    return ratios


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", action="append", required=True, metavar="NAME=PATH",
                   help="a bundle to serve (repeat); names teacher, student, lite0-224 get the target ratios")
    p.add_argument("--data", type=Path, default=bench_serve.DATA, help="real X-rays (class folders of PNGs)")
    bench_serve.load_options(p, concurrency=[1, 32], requests=320, latency_requests=120, warmup=16)
    p.add_argument("--server-args", default="", help="more `covid-cxr serve` options for every server")
    p.add_argument("--json", type=Path, help="write the figures here (atomically)")
    args = p.parse_args(argv)
    args.path = "upload"
    from covid_cxr.bundle import load_bundle
    from covid_cxr.core.files import atomic_write_json

    bundles = {k: load_bundle(v) for k, v in (b.split("=", 1) for b in args.bundle)}
    image = sorted((args.data / "COVID").glob("*.png"))[0]
    load0 = os.getloadavg()[0]
    print("bundles: " + ", ".join(f"{k} = {b.name} v{b.version} ({b.metadata.architecture.name}, "
                                   f"{b.input_hw[0]} px)" for k, b in bundles.items()))
    print(f"image {image.name}; {os.cpu_count()} CPUs; load average before {load0:.2f}; "
          f"commit {subprocess.getoutput('git rev-parse --short HEAD')}", flush=True)
    rows = summary(measure(bundles, image.read_bytes(), args), args.concurrency)
    print(f"\n{args.rounds} round(s) per bundle; img/s: median round; latency percentiles: all rounds; "
          f"load average after {os.getloadavg()[0]:.2f}")
    ratios = print_table(rows, args.concurrency)
    if args.json:
        atomic_write_json(args.json, {"rows": rows, "ratios": ratios, "load_before": load0,
                                      "load_after": os.getloadavg()[0], "rounds": args.rounds})
    failed = sum(r[c]["failed"] for r in rows.values() for c in args.concurrency)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
