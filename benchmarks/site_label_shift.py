"""Does correcting the adapted head for the site's class prevalence pay? (20 labelled films per
class; the rest of the site split in two: an unlabelled half the prevalence is estimated on, and a
test half.) Rows: the site head alone, + the prevalence estimated by EM on the unlabelled half
(covid_cxr.trust.prevalence, what `train --init-from ... --site-unlabelled` does), + the true
prevalence (the ceiling), and the logistic-regression baseline. `--bundle`: whose features (a
frozen or a fine-tuned backbone).

Usage: python benchmarks/site_label_shift.py [--bundle MODELS/<name>/<v>] [--draws 3]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from site_adapt_heads import (MASKS, SITES, draw, feature_cache, features, halves, logits, lr_baseline,  # noqa: E402
                              macro, pools)

from covid_cxr.bundle import load_bundle  # noqa: E402
from covid_cxr.models.loading import load_torch  # noqa: E402
from covid_cxr.train.adapt import SITE_DEPTH, SITE_PRIOR, SITE_STEPS, fit_site_head, out_of_fold_logits  # noqa: E402
from covid_cxr.trust.calibration import fit_temperature, softmax  # noqa: E402
from covid_cxr.trust.prevalence import estimate_prevalence, logit_shift  # noqa: E402


def run(b, m, cl, pool, cache, name, site, seed):
    present = sorted(cl.index(c) for c in site)
    (li, ly), (ri, ry) = draw(site, pool, cl, 20, seed)
    ui, ti = halves(len(ri), seed)
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
