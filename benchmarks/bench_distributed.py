"""Training wall time on 1 process vs N processes under Lightning DDP (gloo on CPU), end to end
through the CLI: the same data, split and settings, each run into its own folder (so no cache is
shared). Prints one JSON object: per device count the wall seconds, test accuracy and epochs run.

  python benchmarks/bench_distributed.py --data ../shared/data/covid19-radiography --max-per-class 100
  python benchmarks/bench_distributed.py --synthetic 12 --image-size 64 --weights none   # a quick check

On a 2-core machine two processes share the cores, so expect no speed-up there; the point is the
figure on a machine with cores (or nodes) to spare. tests/train/test_distributed.py checks the
results agree (features of 2 processes = features of 1; a fine-tuned bundle under DDP).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from covid_cxr.core.files import atomic_write_json


def run(data: Path, out: Path, devices: int, a: argparse.Namespace) -> dict:
    """One `covid-cxr train` with DEVICES processes; wall time and what the bundle says."""
    cmd = [sys.executable, "-m", "covid_cxr", "train", "--data", str(data), "--out", str(out),
           "--weights", a.weights, "--image-size", str(a.image_size), "--epochs", str(a.epochs),
           "--devices", str(devices), "--name", f"ddp{devices}"]
    if devices > 1:
        cmd += ["--strategy", "ddp"]
    if a.finetune:
        cmd += ["--finetune", "--finetune-epochs", str(a.epochs)]
    if a.max_per_class:
        cmd += ["--max-per-class", str(a.max_per_class), "--balance", "undersample"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"error: training with --devices {devices} failed:\n{r.stderr[-2000:]}")
    (meta,) = out.glob(f"ddp{devices}/*/metadata.json")
    m = json.loads(meta.read_text())
    return {"devices": devices, "wall_s": round(wall, 1), "test_accuracy": m["test_metrics"]["accuracy"],
            "epochs_run": m["training"]["history"]["epochs_run"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="labelled class folders (default: --synthetic)")
    ap.add_argument("--synthetic", type=int, default=12, help="generated images per class without --data")
    ap.add_argument("--devices", default="1,2", help="process counts to compare")
    ap.add_argument("--max-per-class", type=int, default=None)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--weights", default="imagenet")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--finetune", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = a.data
        if data is None:
            from covid_cxr.data.synthetic import make_synthetic_dataset

            data = make_synthetic_dataset(Path(tmp) / "data", per_class=a.synthetic, size=a.image_size)
        rows = [run(data, Path(tmp) / f"models-{d}", int(d), a) for d in a.devices.split(",")]
    out = {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "runs": rows}
    print(json.dumps(out, indent=1))
    if a.json:
        atomic_write_json(a.json, out)


if __name__ == "__main__":
    main()
