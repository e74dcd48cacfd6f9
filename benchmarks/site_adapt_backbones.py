"""Which bundle to adapt at a site: the site head on a frozen ImageNet backbone's features, or on a
backbone fine-tuned on chest X-rays (the accurate recipe's student: blocks 4-6 trained on the
development database)? And does self-training on the site's unlabelled films add to either?

Same proxy sites and draws as site_adapt_heads.py (20 labelled films per class, or each of
`--labelled`, whole near-duplicate groups). The rest of each site is split in halves (seeded): one half is the site's
unlabelled films (what `site check` is run on), the other the test set. Per bundle:
- before: the bundle's head (argmax);
- LR: scikit-learn logistic regression on the labelled films' standardised features (the baseline);
- site head: train.adapt.fit_site_head at its defaults (what `train --init-from` ships);
- self-training: the site head, then `--rounds` rounds of refitting on the labelled films plus the
  unlabelled films it answers with confidence >= `--threshold` (pseudo-labels, classes the site has).
Macro-F1 over the site's classes on the test half; mean over draws.

Usage: python benchmarks/site_adapt_backbones.py --bundle frozen=runs/adapt-models/efficientnet_lite0/1 \
    --bundle student=runs/distil-models/accurate/3 [--draws 3] [--labelled 10 20 40] [--json FILE]
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
from covid_cxr.core.files import atomic_write_json  # noqa: E402
from covid_cxr.models.loading import load_torch  # noqa: E402
from covid_cxr.train.adapt import fit_site_head  # noqa: E402


def self_train(head, x, y, xu, rounds: int, threshold: float, seed: int):
    """The site head refitted on the labelled films plus its confident answers on unlabelled ones."""
    h = fit_site_head(head, x, y, seed=seed)
    present = np.unique(y)
    for _ in range(rounds):
        p = torch.softmax(torch.from_numpy(logits(h, xu)), 1).numpy()
        keep = (p.max(1) >= threshold) & np.isin(p.argmax(1), present)
        h = fit_site_head(head, np.concatenate([x, xu[keep]]), np.concatenate([y, p.argmax(1)[keep]]), seed=seed)
    return h


def one_draw(b, model, cache: Path, site: dict, pool, seed: int, a, labelled: int = 20) -> dict[str, float]:
    classes = list(b.classes)
    present = sorted(classes.index(c) for c in site)
    (li, ly), (ri, ry) = draw(site, pool, classes, labelled, seed)
    unl, test = halves(len(ri), seed)
    fx = features(b, model, [MASKS / "images" / f"{i}.png" for i in li + ri], cache)
    x, rest = fx[:len(li)], fx[len(li):]
    y, xu, xt, yt = np.array(ly), rest[unl], rest[test], np.array(ry)[test]
    head = fit_site_head(model.head, x, y, seed=seed)
    st = self_train(model.head, x, y, xu, a.rounds, a.threshold, seed)
    return {"before": macro(yt, logits(model.head, xt).argmax(1), present)[0],
            "LR": macro(yt, lr_baseline(x, y, xt, len(classes)), present)[0],
            "site head": macro(yt, logits(head, xt).argmax(1), present)[0],
            "self-training": macro(yt, logits(st, xt).argmax(1), present)[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", action="append", required=True, help="label=MODELS/<name>/<v> (repeatable)")
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--labelled", type=int, nargs="+", default=[20], help="labelled films per class (one run each)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(1)  # small full-batch fits: one thread is as fast, and does not spin against another job
    pool, _ = pools()
    out: dict = {}
    for spec in a.bundle:
        label, path = spec.split("=", 1)
        b = load_bundle(path)
        model = load_torch(b)
        cache = feature_cache(model)
        for name, site in SITES.items():
            for n in a.labelled:
                key = label if a.labelled == [20] else f"{label}, {n} per class"
                rows = [one_draw(b, model, cache, site, pool, seed, a, n) for seed in range(a.draws)]
                out.setdefault(key, {})[name] = {"draws": rows, "mean": {k: float(np.mean([r[k] for r in rows]))
                                                                        for k in rows[0]}}
                print(key, name, " | ".join(f"{k} {v:.3f}" for k, v in out[key][name]["mean"].items()), flush=True)
            if a.json:
                atomic_write_json(a.json, out)
    print("\n| bundle | site | " + " | ".join(rows[0]) + " |\n|---|---|" + "---:|" * len(rows[0]))
    for label, sites in out.items():
        for name, r in sites.items():
            print(f"| {label} | {name} | " + " | ".join(f"{v:.3f}" for v in r["mean"].values()) + " |")


if __name__ == "__main__":
    main()
