"""How often an operating point's target recall holds on new images: the bundle's validation and
test probabilities pooled, re-split at random many times into a calibration part (as large as the
validation split, per class) and a held-out part; each rule's threshold is fitted on the first
and its recall measured on the second. Rules: the validation quantile (what bundles had) and the
conformal one (evaluate/operating_point.py) at --confidence, over the population and over batches as
large as the held-out part (TrainConfig.target_batch; --batch to choose another size: at the held-out
part's own size the target is met on it with that probability, by construction). This measures the calibration set's
sampling, for one trained model (not retraining seeds).

Usage: python benchmarks/operating_point_holds.py --model MODELS/<name> [MODELS/<member> ...] [--target COVID-19=0.98 ...]
       [--confidence 0.9] [--resplits 1000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from covid_cxr.bundle import load_bundle
from covid_cxr.publish.ensemble import shared_split, split_probabilities
from covid_cxr.bundle.schema import decide
from covid_cxr.evaluate.operating_point import fit_threshold, parse_target


def resplit(y: np.ndarray, n_cal: dict[int, int], rng) -> tuple[np.ndarray, np.ndarray]:
    cal = np.concatenate([rng.choice(np.flatnonzero(y == c), n, replace=False) for c, n in n_cal.items()])
    mask = np.zeros(len(y), bool)
    mask[cal] = True
    return mask, ~mask


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, nargs="+", required=True,
                    help="a bundle, or an ensemble's members (their averaged answers: the ensemble's)")
    ap.add_argument("--target", nargs="+", default=["COVID-19=0.98"])
    ap.add_argument("--confidence", type=float, default=0.9)
    ap.add_argument("--resplits", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=None, help="the batch rule's batch (default: the held-out count)")
    a = ap.parse_args()
    bundles = [load_bundle(m) for m in a.model]
    b = bundles[0]
    prepared = shared_split(bundles)
    yv, pv = split_probabilities(bundles, prepared, "val")[:2]
    yt, pt = split_probabilities(bundles, prepared, "test")[:2]
    for spec in a.target:
        name = (f"{b.name} v{b.version}" if len(bundles) == 1
                else "the ensemble of " + ", ".join(x.name for x in bundles))
        report(name, b.classes, spec, yv, pv, yt, pt, a.confidence, a.resplits, a.batch)


def report(label: str, classes: list[str], spec: str, yv, pv, yt, pt, confidence: float, resplits: int, batch: int | None = None) -> None:
    name, target = parse_target(spec)
    i = classes.index(name)
    y, p = np.concatenate([yv, yt]), np.concatenate([pv, pt])
    n_cal = {c: int((yv == c).sum()) for c in range(len(classes))}
    rng = np.random.default_rng(0)
    held = int((y == i).sum()) - n_cal[i]
    rules = {"quantile": (None, None), f"conformal {confidence}": (confidence, None),
             f"conformal {confidence}, batches of {batch or held}": (confidence, batch or held)}
    rows = {rule: [] for rule in rules}
    for _ in range(resplits):
        cal, new = resplit(y, n_cal, rng)
        for rule, (conf, batch) in rules.items():
            t = fit_threshold(y[cal], p[cal], i, target, conf, batch)
            pred = decide(p[new], i, t)
            pos = y[new] == i
            rows[rule].append(((pred[pos] == i).mean(), (pred == y[new]).mean(), t))
    print(f"\n{label}: target {name} recall >= {target}; calibration {n_cal[i]} {name} images "
          f"(the validation split's), held out {held}; {resplits} re-splits\n")
    print("| rule | target met | mean recall | 5th pct recall | mean accuracy | median threshold |")
    print("|---|---|---|---|---|---|")
    for rule, r in rows.items():
        r = np.array(r)
        print(f"| {rule} | {np.mean(r[:, 0] >= target):.3f} | {r[:, 0].mean():.4f} | {np.quantile(r[:, 0], 0.05):.4f} "
              f"| {r[:, 1].mean():.4f} | {np.median(r[:, 2]):.4f} |")


if __name__ == "__main__":
    main()
