"""Does correcting the adapted head for the site's class prevalence pay? (frozen features, 20
labelled films per class; the rest of the site split in two: an unlabelled half the prevalence is
estimated on, and a test half.) Rows: the site head as shipped, + the prevalence estimated by EM on the
unlabelled half (Saerens, Latinne & Decaestecker 2002, on temperature-calibrated answers: Alexandari
et al. 2020; written here in 20 lines rather than adding QuaPy, whose EMQ is the same loop but whose
install brings pandas, xlrd and ucimlrepo),
+ the true prevalence (the ceiling), and the logistic-regression baseline.

Usage: python benchmarks/site_label_shift.py [--draws 3]   (features cached like site_adapt_heads.py)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from site_adapt_heads import MASKS, SITES, draw, feature_cache, features, logits, lr_baseline, macro, pools  # noqa: E402

from covid_cxr.bundle import load_bundle  # noqa: E402
from covid_cxr.models.loading import load_torch  # noqa: E402
from covid_cxr.train.adapt import SITE_DEPTH, SITE_PRIOR, SITE_STEPS, fit_site_head, out_of_fold_logits  # noqa: E402
from covid_cxr.trust.calibration import fit_temperature, softmax  # noqa: E402


FLOOR = 1e-3  # no class's prior goes below this: a shift of log(0) would remove the class for good


def estimate_prevalence(probs: np.ndarray, train_prior: np.ndarray, tol: float = 1e-8,
                        max_iter: int = 1000) -> np.ndarray:
    """The class prevalence of the films behind `probs` (N x C calibrated probabilities of a model
    whose training prior was `train_prior`), by EM: reweight each answer by prior / training prior,
    renormalise, take the mean as the new prior, until it stops moving."""
    p = np.asarray(probs, np.float64)
    base = np.clip(np.asarray(train_prior, np.float64), 1e-12, None)
    prior = base.copy()
    for _ in range(max_iter):
        w = p * (prior / base)
        w /= w.sum(axis=1, keepdims=True)
        new = w.mean(axis=0)
        if np.abs(new - prior).max() < tol:
            return new
        prior = new
    return prior


def logit_shift(train_prior: np.ndarray, site_prior: np.ndarray, floor: float = FLOOR) -> np.ndarray:
    """What to add to the tempered logits (logits / T) so the answers carry the site's prior."""
    site = np.clip(np.asarray(site_prior, np.float64), floor, None)
    return np.log(site / site.sum()) - np.log(np.clip(np.asarray(train_prior, np.float64), floor, None))


def run(b, m, cl, pool, cache, name, site, seed):
    present = sorted(cl.index(c) for c in site)
    (li, ly), (ri, ry) = draw(site, pool, cl, 20, seed)
    half = np.random.default_rng(seed + 100).permutation(len(ri))
    ui, ti = half[: len(ri) // 2], half[len(ri) // 2:]
    fx = features(b, m, [MASKS / "images" / f"{i}.png" for i in li + ri], cache)
    x, rest = fx[: len(li)], fx[len(li):]
    y, yr = np.array(ly), np.array(ry)
    xu, xt, yt = rest[ui], rest[ti], yr[ti]
    head = fit_site_head(m.head, x, y, SITE_DEPTH, SITE_PRIOR, steps=SITE_STEPS, seed=seed)
    oof = out_of_fold_logits(m.head, x, y, seed)
    t = fit_temperature(oof, y)
    base = softmax(oof / t).mean(0)
    est = estimate_prevalence(softmax(logits(head, xu) / t), base)
    true = np.bincount(yr[ui], minlength=len(cl)) / len(ui)
    zt = logits(head, xt) / t
    row = {"LR": macro(yt, lr_baseline(x, y, xt, len(cl)), present)[0],
           "head": macro(yt, zt.argmax(1), present)[0],
           "head+EM": macro(yt, (zt + logit_shift(base, est)).argmax(1), present)[0],
           "head+true": macro(yt, (zt + logit_shift(base, true)).argmax(1), present)[0]}
    print(f"{name} seed {seed} (labelled {len(y)}, unlabelled {len(ui)}, test {len(ti)}): "
          + " | ".join(f"{k} {v:.3f}" for k, v in row.items())
          + f" | est {np.round(est, 3).tolist()} true {np.round(true, 3).tolist()} train {np.round(base, 3).tolist()}",
          flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", default="runs/adapt-models/efficientnet_lite0/1")
    ap.add_argument("--draws", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)  # small full-batch fits: one thread is as fast, and does not spin against another job
    b = load_bundle(a.bundle)
    m, cl = load_torch(b), list(b.classes)
    pool, _ = pools()
    cache = feature_cache(m)
    rows = {}
    for name, site in SITES.items():
        rows[name] = [run(b, m, cl, pool, cache, name, site, s) for s in range(a.draws)]
    for name, rs in rows.items():
        print(name, " | ".join(f"{k} {np.mean([r[k] for r in rs]):.3f}" for k in rs[0]))


if __name__ == "__main__":
    main()
