"""The configuration table of issue 9: frozen / fine-tuned x lite0/1/2 x input size x ensemble, on
all images of the real dataset (class weights), several seeds (each seed: another split).

Each row: accuracy (95 % Wilson CI), COVID-19 recall (CI), macro-F1, training time (the whole
`train()`: data, features, fit, evaluation, bundle). Rows are appended to OUT/table.csv as they
finish, and a finished row is not run again, so the script can be stopped and restarted.
Feature and trunk caches are shared (OUT/work), as a user's repeated runs would share them;
`features_s` says what each run paid for extraction.

Usage: python benchmarks/bench_accuracy.py --out /work/runs-9/table [--data DIR] [--only NAME,...]
       python benchmarks/bench_accuracy.py --out ... --markdown      # print the table
"""

from __future__ import annotations

import argparse
import csv
import logging
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "covid19-radiography"
FIELDS = ["name", "arch", "size", "finetune", "seed", "members", "n", "accuracy", "acc_lo", "acc_hi",
          "covid_recall", "rec_lo", "rec_hi", "macro_f1", "op_accuracy", "op_covid_recall", "train_s",
          "features_s", "bundle"]
# Every row also gets the COVID-19 operating point (--target-recall COVID-19=0.97, fitted on validation)
BASE = {"balance": "weights", "lr_find": False, "progress": False, "target_recall": "COVID-19=0.97"}
FT = {"finetune": True, "finetune_views": 3, "finetune_epochs": 8}  # 1 plain + 2 augmented cached views per image

# name -> TrainConfig fields (single models) ...
CONFIGS = {
    **{f"frozen-lite0-224-s{s}": {"arch": "efficientnet_lite0", "seed": s} for s in (0, 1, 2)},
    "ft-lite0-224-s0": {"arch": "efficientnet_lite0", "seed": 0, **FT},
    "frozen-lite0-256-s0": {"arch": "efficientnet_lite0", "image_size": 256, "seed": 0},
    "frozen-lite1-224-s0": {"arch": "efficientnet_lite1", "image_size": 224, "seed": 0},
    "frozen-lite2-224-s0": {"arch": "efficientnet_lite2", "image_size": 224, "seed": 0},
    **{f"ft-lite0-224-s{s}": {"arch": "efficientnet_lite0", "seed": s, **FT} for s in (1, 2)},
    "ft-lite1-224-s0": {"arch": "efficientnet_lite1", "image_size": 224, "seed": 0, **FT},
    "ft-lite2-224-s0": {"arch": "efficientnet_lite2", "image_size": 224, "seed": 0, **FT},
}
# ... and ensembles of rows above (same seed: the same split)
ENSEMBLES = {
    "ens-frozen-lite012-224-s0": ["frozen-lite0-224-s0", "frozen-lite1-224-s0", "frozen-lite2-224-s0"],
    "ens-ft-lite012-224-s0": ["ft-lite0-224-s0", "ft-lite1-224-s0", "ft-lite2-224-s0"],
}
ORDER = ["frozen-lite0-224-s0", "ft-lite0-224-s0", "ft-lite1-224-s0", "ft-lite2-224-s0", "ens-ft-lite012-224-s0",
         "frozen-lite0-224-s1", "frozen-lite0-224-s2", "frozen-lite0-256-s0", "frozen-lite1-224-s0",
         "frozen-lite2-224-s0", "ens-frozen-lite012-224-s0", "ft-lite0-224-s1", "ft-lite0-224-s2"]


def row_of(name: str, m: dict, cfg: dict, train_s: float, features_s: float, bundle: Path, members="") -> dict:
    c = m["per_class"]["COVID-19"]
    return {"name": name, "arch": cfg.get("arch", "ensemble"), "size": cfg.get("image_size") or 224,
            "finetune": cfg.get("finetune", False), "seed": cfg.get("seed", 0), "members": members, "n": m["n"],
            "accuracy": round(m["accuracy"], 4), "acc_lo": round(m["accuracy_ci95"][0], 4),
            "acc_hi": round(m["accuracy_ci95"][1], 4), "covid_recall": round(c["recall"], 4),
            "rec_lo": round(c["recall_ci95"][0], 4), "rec_hi": round(c["recall_ci95"][1], 4),
            "macro_f1": round(m["macro_f1"], 4), **op_columns(m), "train_s": round(train_s, 1),
            "features_s": round(features_s, 1), "bundle": str(bundle)}


def op_columns(m: dict) -> dict:
    """Accuracy and COVID-19 recall at the operating point ('' for rows without one)."""
    op = (m.get("operating_point") or {}).get("metrics")
    if not op:
        return {"op_accuracy": "", "op_covid_recall": ""}
    return {"op_accuracy": round(op["accuracy"], 4), "op_covid_recall": round(op["per_class"]["COVID-19"]["recall"], 4)}


_MANIFEST: dict = {}


def run_one(name: str, data: Path, out: Path) -> dict:
    """One training. The dataset is scanned once per process (prepare() with the kept manifest);
    the scan's time is added to every row, since a user's single run pays it."""
    from covid_cxr.data import build_manifest, prepare
    from covid_cxr.train.fit import TrainConfig, train

    if "man" not in _MANIFEST:
        t = time.perf_counter()
        _MANIFEST["man"] = build_manifest(data, progress=False)
        _MANIFEST["scan_s"] = time.perf_counter() - t
    c = TrainConfig(**BASE, **CONFIGS[name], name=name)
    t = time.perf_counter()
    prepared = prepare(data, c.classes, c.balance, c.max_per_class, c.seed, progress=False, manifest=_MANIFEST["man"])
    r = train(data, out / "models", c, workdir=out / "work", prepared=prepared)
    took = time.perf_counter() - t + _MANIFEST["scan_s"]
    return row_of(name, r.metrics.model_dump(), CONFIGS[name], took, r.timings.get("features", 0), r.bundle_path)


def run_ensemble(name: str, out: Path, done: dict) -> dict:
    from covid_cxr.publish.ensemble import build_ensemble

    members = ENSEMBLES[name]
    t = time.perf_counter()
    b = build_ensemble([Path(done[m]["bundle"]) for m in members], out / "models", name,
                       target_recall=BASE["target_recall"])
    train_s = sum(float(done[m]["train_s"]) for m in members) + time.perf_counter() - t
    cfg = {"seed": done[members[0]]["seed"], "finetune": done[members[0]]["finetune"]}
    return row_of(name, b.metadata.test_metrics.model_dump(), cfg, train_s, 0.0, b.path, "+".join(members))


def read_rows(path: Path) -> dict:
    if not path.is_file():
        return {}
    with path.open() as f:
        return {r["name"]: r for r in csv.DictReader(f)}


def append(path: Path, row: dict) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)


def markdown(rows: dict) -> str:
    lines = ["| configuration | n | accuracy (95% CI) | COVID-19 recall (95% CI) | macro-F1 | op. point acc / "
             "COVID-19 recall | train s |", "|---|---|---|---|---|---|---|"]
    for r in rows.values():
        lines.append(f"| {r['name']} | {r['n']} | {float(r['accuracy']):.3f} ({float(r['acc_lo']):.3f}-"
                     f"{float(r['acc_hi']):.3f}) | {float(r['covid_recall']):.3f} ({float(r['rec_lo']):.3f}-"
                     f"{float(r['rec_hi']):.3f}) | {float(r['macro_f1']):.3f} | {r.get('op_accuracy') or '-'} / "
                     f"{r.get('op_covid_recall') or '-'} | {float(r['train_s']):.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", default="")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    table = a.out / "table.csv"
    if a.markdown:
        print(markdown(read_rows(table)))
        return
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    a.out.mkdir(parents=True, exist_ok=True)
    for name in [n for n in ORDER if not a.only or n in a.only.split(",")]:
        done = read_rows(table)
        if name in done:
            continue
        if name in ENSEMBLES and not all(m in done for m in ENSEMBLES[name]):
            print(f"skip {name}: members missing", flush=True)
            continue
        row = run_ensemble(name, a.out, done) if name in ENSEMBLES else run_one(name, a.data, a.out)
        append(table, row)
        print(f"{time.strftime('%H:%M:%S')} {name}: acc {row['accuracy']} covid recall {row['covid_recall']} "
              f"macro-F1 {row['macro_f1']} in {row['train_s']} s (features {row['features_s']} s)", flush=True)


if __name__ == "__main__":
    main()
