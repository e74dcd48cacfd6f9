"""Compare trained bundles on their *validation* split only, so a configuration can be chosen without
looking at the test split: accuracy, macro-F1, log loss, COVID-19 recall (argmax) and the COVID-19
ROC AUC (how well the probability ranks COVID-19 first: what an operating point can use).
Each row is one bundle, or several member bundles joined by commas (their averaged probabilities:
what `covid-cxr ensemble` of them answers). The validation split is prepared again from the
bundles' metadata (bundle/ensemble.py: members must share it); probabilities are their model.onnx's.

Usage: python benchmarks/val_compare.py --model MODELS/a[,MODELS/b,...] [--model ...] [--class COVID-19]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def val_row(paths: str, positive: str) -> dict:
    from sklearn.metrics import log_loss, roc_auc_score

    from covid_cxr.bundle import load_bundle
    from covid_cxr.publish.ensemble import shared_split, split_probabilities
    from covid_cxr.evaluate.metrics import compute_metrics

    members = [load_bundle(Path(p)) for p in paths.split(",")]
    b = members[0]
    y, p, _ = split_probabilities(members, shared_split(members), "val")
    m = compute_metrics(y, p, b.classes)
    k = b.classes.index(positive)
    return {"bundle": " + ".join(f"{m.name} v{m.version}" for m in members) + f" ({b.input_hw[0]} px)", "n": len(y), "accuracy": m.accuracy,
            "macro_f1": m.macro_f1, "log_loss": float(log_loss(y, p, labels=range(len(b.classes)))),
            "recall": float((p[y == k].argmax(axis=1) == k).mean()), "auc": float(roc_auc_score(y == k, p[:, k]))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", required=True, help="a bundle, or members joined by commas")
    ap.add_argument("--class", dest="positive", default="COVID-19")
    a = ap.parse_args()
    print(f"| bundle | val n | accuracy | macro-F1 | log loss | {a.positive} recall (argmax) | {a.positive} ROC AUC |")
    print("|---|---|---|---|---|---|---|")
    for path in a.model:
        r = val_row(path, a.positive)
        print(f"| {r['bundle']} | {r['n']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['log_loss']:.4f} | "
              f"{r['recall']:.3f} | {r['auc']:.4f} |", flush=True)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
