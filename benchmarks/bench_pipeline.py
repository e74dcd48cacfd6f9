"""Pipeline benchmark on the real dataset: prints figures and ratios measured side by side in one run.

1. `covid-cxr run`, the study's protocol (219 per class, efficientnet_lite0): seconds per stage,
   peak resident memory (a fresh process, fresh feature cache). Target: < 180 s.
2. The same with all 4,137 images and --balance weights. Targets: < 600 s, < 3 GiB.
3. Backbone feature extraction, images/second per architecture at its input size: fp32,
   fp32 channels-last, bf16 channels-last (autocast), on real X-rays.
4. Head training on cached features vs training through the frozen backbone, same epochs.

Usage: python benchmarks/bench_pipeline.py [--data DIR] [--skip-all] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "covid19-radiography"


def run_cli(args: list[str]) -> tuple[float, float, dict]:
    """Run `covid-cxr run ...` in a fresh process; (wall seconds, peak RSS GiB, summary.json)."""
    out = Path(args[args.index("--out") + 1])
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "covid_cxr", "run", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"run failed: {proc.stderr.read()[-2000:]}")
    summary = json.loads((out / "report" / "summary.json").read_text())
    return wall, usage.ru_maxrss / 2**20, summary


def print_run(title: str, wall: float, rss: float, summary: dict, limit_s: float, limit_gib: float | None) -> None:
    print(f"\n== {title}")
    for stage, s in summary["timings_s"].items():
        print(f"  {stage:<45} {s:7.1f} s")
    rows = [r for r in summary["comparison"] if r["Category"] == "COVID-19"]
    acc = rows[0]["Accuracy"] if rows else float("nan")
    rec = rows[0]["Recall"] if rows else float("nan")
    print(f"  {'total wall (process start to report)':<45} {wall:7.1f} s   target < {limit_s:.0f} s: "
          f"{'MET' if wall < limit_s else 'NOT MET'}")
    mem = f"   target < {limit_gib} GiB: {'MET' if rss < limit_gib else 'NOT MET'}" if limit_gib else ""
    print(f"  {'peak resident memory':<45} {rss:7.2f} GiB{mem}")
    print(f"  test accuracy {acc}, COVID-19 recall {rec}")


def bench_extraction(data: Path, archs: list[str], n: int) -> None:
    import torch

    from covid_cxr.data.decode import load_batch
    from covid_cxr.models import create_model, get_spec

    paths = sorted(data.glob("*/*.png"))[:: max(1, 4137 // n)][:n]
    print(f"\n== backbone feature extraction, images/s ({len(paths)} real X-rays, batch 32, "
          f"{torch.get_num_threads()} threads; decode+resize included)")
    print(f"  {'architecture':<20}{'fp32':>10}{'fp32 CL':>10}{'bf16 CL':>10}{'CL/fp32':>9}{'bf16/fp32':>10}  max|Δf| bf16")
    for arch in archs:
        size = get_spec(arch).input_size
        weights = "imagenet" if arch.startswith("efficientnet") else "none"  # same cost either way
        model, _ = create_model(arch, weights=weights)
        model.eval()
        x_all = [torch.from_numpy(load_batch(paths[i:i + 32], size, size))[:, None]
                 for i in range(0, len(paths), 32)]
        rates, feats = {}, {}
        for mode in ("fp32", "fp32 CL", "bf16 CL"):
            cl = "CL" in mode
            model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode.startswith("bf16")):
                model.features(x_all[0][:4])  # warm-up
                t = time.perf_counter()
                out = []
                for i in range(0, len(paths), 32):  # decode+resize timed too: what training pays
                    x = torch.from_numpy(load_batch(paths[i:i + 32], size, size))[:, None]
                    if cl:
                        x = x.contiguous(memory_format=torch.channels_last)
                    out.append(model.features(x).float())
                rates[mode] = len(paths) / (time.perf_counter() - t)
                feats[mode] = torch.cat(out)
        rel = ((feats["bf16 CL"] - feats["fp32"]).abs().max() / feats["fp32"].abs().max()).item()
        print(f"  {arch:<20}{rates['fp32']:>10.1f}{rates['fp32 CL']:>10.1f}{rates['bf16 CL']:>10.1f}"
              f"{rates['fp32 CL'] / rates['fp32']:>8.2f}x{rates['bf16 CL'] / rates['fp32']:>9.2f}x  {rel:.3f} (relative)")


def bench_cache_ratio(data: Path, epochs: int, per_class: int) -> None:
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    from covid_cxr.data import prepare
    from covid_cxr.train.fit import TrainConfig, train

    prepared = prepare(data, balance="undersample", max_per_class=per_class, seed=0, progress=False)
    res = {}
    for cached in (True, False):
        cfg = TrainConfig(arch="efficientnet_lite0", epochs=epochs, patience=epochs + 1, max_per_class=per_class,
                          cache_features=cached, progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            r = train(data, Path(tmp) / "m", cfg, workdir=Path(tmp) / "w", prepared=prepared)
        res[cached] = r.timings["features"] + r.timings["train"]
        res[(cached, "acc")] = r.metrics.accuracy
    print(f"\n== head training, efficientnet_lite0, {per_class}/class, {epochs} epochs (feature extraction included)")
    print(f"  on cached features          {res[True]:7.1f} s   test accuracy {res[(True, 'acc')]:.3f}")
    print(f"  through the frozen backbone {res[False]:7.1f} s   test accuracy {res[(False, 'acc')]:.3f}")
    print(f"  speed-up of the feature cache: {res[False] / res[True]:.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--skip-all", action="store_true", help="skip the 4,137-image run")
    ap.add_argument("--quick", action="store_true", help="efficientnet_lite0 only, fewer images")
    a = ap.parse_args()
    print(f"machine: {os.cpu_count()} CPUs; data: {a.data}")
    with tempfile.TemporaryDirectory() as tmp:
        wall, rss, s = run_cli(["--data", str(a.data), "--out", f"{tmp}/study", "--archs", "efficientnet_lite0",
                                "--balance", "undersample", "--max-per-class", "219"])
        print_run("covid-cxr run: the study's protocol (219/class, efficientnet_lite0)", wall, rss, s, 180, None)
        if not a.skip_all:
            wall, rss, s = run_cli(["--data", str(a.data), "--out", f"{tmp}/all", "--archs", "efficientnet_lite0",
                                    "--balance", "weights"])
            print_run("covid-cxr run: all 4,137 images, --balance weights", wall, rss, s, 600, 3.0)
    archs = ["efficientnet_lite0"] if a.quick else ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
                                                     "resnet50", "densenet121", "vgg16"]
    bench_extraction(a.data, archs, 32 if a.quick else 96)
    bench_cache_ratio(a.data, epochs=5, per_class=60 if a.quick else 219)
    print(f"\nbenchmark process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
