"""Teacher vs student (issue 19, item 1): two or more bundles trained on one split, scored side by
side on that split's test images, each as it answers when served (its model.onnx; argmax and its
operating point).

Per bundle: accuracy, macro-F1 and COVID-19 recall with 95 % Wilson intervals, at the argmax and at
the operating point, and whether the operating point meets its target recall on the test split.
Against the first bundle (the teacher): the share of changed answers (decided class) with its
Wilson interval, and the differences in points. The split is the first bundle's (its members',
for an ensemble), prepared again from --data and checked against every bundle's record.

    python benchmarks/bench_distil.py --data DIR --bundle teacher=MODELS/accurate-teacher \\
        --bundle student=MODELS/accurate [--bundle lite0-224=MODELS/lite0-224] [--json runs/distil.json]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "covid19-radiography"
TARGET_POINTS = 0.5  # the student within 0.5 point of the teacher (accuracy, COVID-19 recall)
POSITIVE = "COVID-19"


def test_split(bundles, data: Path):
    """The first bundle's test split, prepared from `data`; every bundle must come from that split."""
    from covid_cxr.data import prepare
    from covid_cxr.train.distil import SPLIT_KEYS, teacher_split

    d = teacher_split(bundles[0])
    prepared = prepare(data, None, d["balance"], d["max_per_class"], d["seed"], progress=False)  # all classes
    want = {k: prepared.describe()[k] for k in SPLIT_KEYS}
    for b in bundles:
        got = teacher_split(b)
        if {k: got.get(k) for k in SPLIT_KEYS} != want:
            sys.exit(f"{b.path}: not trained on the split of {bundles[0].path} (or not on {data})")
    return prepared


def answers(bundle, paths: list[Path]) -> tuple[np.ndarray, float]:
    """Probabilities on the test images (decoded at the bundle's size) and seconds per image."""
    from covid_cxr.data.decode import load_batch

    h, w = bundle.input_hw
    out, t0 = [], time.perf_counter()
    for i in range(0, len(paths), 32):
        out.append(bundle.predict(load_batch(paths[i:i + 32], h, w)))
    return np.concatenate(out), (time.perf_counter() - t0) / len(paths)


def scores(y: np.ndarray, probs: np.ndarray, decided: np.ndarray, classes: list[str], op) -> dict:
    from covid_cxr.evaluate.metrics import compute_metrics, wilson

    pos = classes.index(POSITIVE)
    row = {}
    for tag, pred in (("argmax", probs.argmax(1)), ("op", decided)):
        m = compute_metrics(y, probs, classes, pred).model_dump()
        c = m["per_class"][POSITIVE]
        row[tag] = {"accuracy": m["accuracy"], "accuracy_ci95": m["accuracy_ci95"], "macro_f1": m["macro_f1"],
                    "covid_recall": c["recall"], "covid_recall_ci95": c["recall_ci95"],
                    "covid_found": int(((pred == pos) & (y == pos)).sum()), "covid_n": int((y == pos).sum())}
    if op is not None:
        r = row["op"]
        r["target_recall"], r["threshold"] = op.target_recall, op.threshold
        r["target_met"] = r["covid_recall"] >= op.target_recall
        r["target_met_ci95"] = list(wilson(r["covid_found"], r["covid_n"]))
    return row


def compare(rows: dict, decided: dict, first: str) -> dict:
    from covid_cxr.evaluate.metrics import wilson

    out = {}
    for name in rows:
        if name == first:
            continue
        changed = int((decided[name] != decided[first]).sum())
        n = len(decided[first])
        out[name] = {"changed": changed, "n": n, "changed_share": changed / n, "changed_ci95": list(wilson(changed, n)),
                     **{f"{k}_points": 100 * (rows[name]["op"][k] - rows[first]["op"][k])
                        for k in ("accuracy", "covid_recall", "macro_f1")}}
    return out


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def print_table(rows: dict, diffs: dict, first: str) -> None:
    print(f"{'bundle':>14} | {'rule':>6} | {'accuracy (95% CI)':>20} | {'macro-F1':>8} | "
          f"{'COVID-19 recall (95% CI)':>26} | target met")
    print("-" * 100)
    for name, row in rows.items():
        for rule in ("argmax", "op"):
            r = row[rule]
            lo, hi = r["accuracy_ci95"]
            rlo, rhi = r["covid_recall_ci95"]
            met = "" if "target_met" not in r else (
                f"{'yes' if r['target_met'] else 'NO'} ({'>=' if r['target_met'] else '<'} {r['target_recall']})")
            print(f"{name:>14} | {rule:>6} | {pct(r['accuracy']):>6} ({pct(lo)}–{pct(hi)}) | {pct(r['macro_f1']):>8} | "
                  f"{pct(r['covid_recall']):>5} {r['covid_found']}/{r['covid_n']} ({pct(rlo)}–{pct(rhi)}) | {met}")
    print()
    for name, d in diffs.items():
        lo, hi = d["changed_ci95"]
        ok = abs(d["accuracy_points"]) <= TARGET_POINTS or d["accuracy_points"] > 0
        ok_r = abs(d["covid_recall_points"]) <= TARGET_POINTS or d["covid_recall_points"] > 0
        print(f"{name} vs {first} (operating points): changed answers {d['changed']}/{d['n']} = {pct(d['changed_share'])} % "
              f"(95% CI {pct(lo)}–{pct(hi)}); accuracy {d['accuracy_points']:+.2f} points "
              f"({'within' if ok else 'NOT within'} {TARGET_POINTS}), COVID-19 recall {d['covid_recall_points']:+.2f} "
              f"points ({'within' if ok_r else 'NOT within'} {TARGET_POINTS}), macro-F1 {d['macro_f1_points']:+.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DATA, help="the dataset the bundles were trained on")
    p.add_argument("--bundle", action="append", required=True, metavar="NAME=PATH",
                   help="a bundle to score (repeat; the first is the teacher the others are compared with)")
    p.add_argument("--json", type=Path, help="write the figures here (atomically)")
    args = p.parse_args(argv)
    from covid_cxr.bundle import load_bundle
    from covid_cxr.core.files import atomic_write_json

    named = dict(b.split("=", 1) for b in args.bundle)
    bundles = {k: load_bundle(v) for k, v in named.items()}
    first = next(iter(bundles))
    print(f"load average before: {os.getloadavg()[0]:.2f}; commit {subprocess.getoutput('git rev-parse --short HEAD')}")
    prepared = test_split(list(bundles.values()), args.data)
    recs = prepared.splits["test"]
    classes = list(prepared.classes)
    y = np.array([classes.index(r.label) for r in recs])
    paths = [prepared.manifest.root / r.path for r in recs]
    rows, decided, speed = {}, {}, {}
    for name, b in bundles.items():
        probs, speed[name] = answers(b, paths)
        decided[name] = b.decide(probs)
        rows[name] = scores(y, probs, decided[name], classes, b.metadata.operating_point)
    diffs = compare(rows, decided, first)
    print(f"test split: {len(y)} images ({int((y == classes.index(POSITIVE)).sum())} COVID-19), seed "
          f"{prepared.seed}; op = the bundle's operating point (its decisions)\n")
    print_table(rows, diffs, first)
    print("\nscoring time (decode + model.onnx, ms per image, this load): " +
          ", ".join(f"{k} {1000 * v:.1f}" for k, v in speed.items()))
    if args.json:
        atomic_write_json(args.json, {"rows": rows, "against_" + first: diffs, "ms_per_image": speed,
                                      "bundles": {k: str(v) for k, v in named.items()},
                                      "load_average": os.getloadavg()[0]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
