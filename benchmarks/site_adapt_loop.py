"""Adaptation that closes the loop (issue 16, item 5): on each proxy site, before and after
`covid-cxr train --init-from BUNDLE --data SITE_LABELLED` with `--labelled` films per class.

Per site (benchmarks/site_adapt_heads.py's SITES; the seed-0 draw, or each of `--draws`): the labelled films go into
a class-folder site (symbolic links), the rest of the site is the test set. Reported:
- macro-F1 (over the classes the site has) and recall per class on the rest: the bundle before,
  the adapted bundle (through its ONNX model, as it serves), and a scikit-learn logistic regression
  on the frozen features of the same labelled films (the baseline to beat);
- `site check` before and after: the share of `--batches` random 20-film batches of the rest
  called `shift detected` (before: against the bundle's reference; after: against the adapted
  bundle's, which is built from the site's labelled films), and the same for films of another site
  (the development database; v7 for the quex site), which must still shift.

With `--unlabelled` the rest is split in halves (seeded): one half is the site's unlabelled films, the
other the test set, and the site is adapted twice: as above, and with `--site-unlabelled` (the
site's class prevalence estimated on the unlabelled half).

Usage: python benchmarks/site_adapt_loop.py --bundle MODELS/<name>/<v> --out runs/adapt-loop [--draws 0 1 2]
    [--unlabelled] [--json FILE]
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_site import flagged  # noqa: E402
from site_adapt_heads import (DEV, MASKS, SITES, draw, feature_cache, features, halves, lr_baseline,  # noqa: E402
                              macro, pools)

from covid_cxr.bundle import load_bundle  # noqa: E402
from covid_cxr.core.files import atomic_write_json  # noqa: E402
from covid_cxr.site.check import measure  # noqa: E402

BATCH = 20


def link(ids: list[str], labels: list[int] | None, classes: list[str], folder: Path) -> list[Path]:
    """Symbolic links to the films, one folder per class; `labels` None: one folder, no classes."""
    out = []
    for n, i in enumerate(ids):
        p = folder / (classes[labels[n]] if labels is not None else "") / f"{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.exists():
            p.symlink_to((MASKS / "images" / f"{i}.png").resolve())
        out.append(p)
    return out


def scores(bundle, paths, y, present, a) -> tuple[dict, object]:
    """(figures on `paths` with labels `y`: macro-F1, recall per class, share of batches flagged; the pool)."""
    pool, _ = measure(bundle, paths)
    f1, rec = macro(np.asarray(y), bundle.decide(pool.probs), present)
    share, moved = flagged(bundle.metadata.site_reference, pool, bundle.classes, BATCH, a.batches)
    return {"macro_f1": f1, "recall": {bundle.classes[c]: r for c, r in rec.items()}, "flagged": share,
            "moved": {k: round(v, 3) for k, v in list(moved.items())[:4]}}, pool


def other_sites(site_name: str, pool_ids, n_dev: int = 300) -> dict[str, list[Path]]:
    with (DEV / "manifest.csv").open() as f:
        rows = list(csv.DictReader(f))
    pick = np.random.default_rng(0).choice(len(rows), n_dev, replace=False)
    out = {"development database": [DEV / rows[i]["path"] for i in sorted(pick)]}
    if "v7" not in site_name:
        out["v7"] = [MASKS / "images" / f"{i}.png" for g in pool_ids[("v7", "COVID-19")] for i in g]
    return out


def adapt(bundle, root: Path, unlabelled: Path | None, a):
    """`covid-cxr train --init-from BUNDLE --data root/labelled [--site-unlabelled DIR]`: (bundle, seconds)."""
    from covid_cxr.core.config import TrainConfig
    from covid_cxr.train.fit import train

    name = f"adapted-{root.name.replace('+', '-')}" + ("-prevalence" if unlabelled else "")
    cfg = TrainConfig(init_from=str(bundle.path), lr_find=False, progress=False, name=name,
                      site_unlabelled=str(unlabelled) if unlabelled else None)
    t = time.perf_counter()
    path = train(root / "labelled", a.out / "models", cfg, workdir=a.workdir).bundle_path
    return load_bundle(path), time.perf_counter() - t


def other_site_flags(name, pool_ids, bundle, adapted, classes, a) -> dict:
    out = {}
    for other, paths in other_sites(name, pool_ids).items():
        before, _ = measure(bundle, paths)
        after, _ = measure(adapted, paths)
        out[other] = {"n": len(paths),
                      "flagged_before": flagged(bundle.metadata.site_reference, before, classes, BATCH, a.batches)[0],
                      "flagged_after": flagged(adapted.metadata.site_reference, after, classes, BATCH, a.batches)[0]}
    return out


def run_site(name, site, pool_ids, bundle, model, a, seed: int = 0) -> dict:
    classes = list(bundle.classes)
    present = sorted(classes.index(c) for c in site)
    (li, ly), (ri, ry) = draw(site, pool_ids, classes, a.labelled, seed)
    root = a.out / (name if seed == 0 else f"{name}-draw{seed}")
    link(li, ly, classes, root / "labelled")
    unl, test = halves(len(ri), seed) if a.unlabelled else ([], range(len(ri)))
    ti, ty, unl = [ri[i] for i in test], [ry[i] for i in test], [ri[i] for i in unl]
    rest = link(ti, ty, classes, root / ("test" if a.unlabelled else "rest"))
    res = {"labelled": len(li), "rest": len(ti), "unlabelled": len(unl),
           "per_class_labelled": {classes[c]: int(np.sum(np.array(ly) == c)) for c in present}}
    res["before"], _ = scores(bundle, rest, ty, present, a)
    fx = features(bundle, model, [MASKS / "images" / f"{i}.png" for i in li + ti], a.cache)
    f1, rec = macro(np.array(ty), lr_baseline(fx[:len(li)], np.array(ly), fx[len(li):], len(classes)), present)
    res["logistic_regression"] = {"macro_f1": f1, "recall": {classes[c]: r for c, r in rec.items()}}
    if unl:
        link(unl, None, classes, root / "unlabelled")
    runs = {"after": None, "after, site prevalence": root / "unlabelled" if unl else None}
    for key, folder in runs.items():
        if key == "after" or folder is not None:
            adapted, res[f"{key}: adapt_seconds"] = adapt(bundle, root, folder, a)
            res[key], _ = scores(adapted, rest, ty, present, a)
            if folder is not None:
                res[key]["estimated_prevalence"] = adapted.metadata.trust.prevalence.prevalence
    res["other_sites"] = other_site_flags(name, pool_ids, bundle, adapted, classes, a)  # the last adapted
    where = adapted.path.resolve()
    res["adapted_bundle"] = str(where.relative_to(REPO)) if where.is_relative_to(REPO) else where.name
    return res


def print_site(name: str, r: dict) -> None:
    per = ", ".join(f"{k} {v}" for k, v in r["per_class_labelled"].items())
    unl = f", {r['unlabelled']} unlabelled" if r.get("unlabelled") else ""
    print(f"\n### {name}: {r['labelled']} labelled films ({per}){unl}; {r['rest']} films are the test set\n")
    print("| model | macro-F1 | recall per class | 20-film batches of the test set flagged |")
    print("|---|---|---|---|")
    rows = (("before (the bundle)", "before"), ("logistic regression, same labelled films", "logistic_regression"),
            ("after (adapted bundle)", "after"), ("after, with the site's prevalence", "after, site prevalence"))
    for label, key in rows:
        if key not in r:
            continue
        m = r[key]
        rec = ", ".join(f"{k} {v:.2f}" for k, v in m["recall"].items())
        fl = f"{m['flagged']:.0%} ({', '.join(f'{k} {v:.0%}' for k, v in m['moved'].items()) or 'none'})" \
            if "flagged" in m else ""
        print(f"| {label} | {m['macro_f1']:.3f} | {rec} | {fl} |")
    for other, o in r["other_sites"].items():
        print(f"\nanother site, {other} ({o['n']} films): 20-film batches flagged {o['flagged_before']:.0%} against the "
              f"bundle's reference, {o['flagged_after']:.0%} against the adapted bundle's")
    print("\nadaptation took " + ", ".join(f"{v:.0f} s ({k.split(':')[0]})" for k, v in r.items() if k.endswith("seconds")))


def main() -> None:
    from covid_cxr.models.loading import load_torch

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--labelled", type=int, default=20)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--sites", default=",".join(SITES))
    ap.add_argument("--cache", type=Path, help="feature cache (default: one per backbone, feature_cache)")
    ap.add_argument("--workdir", type=Path, help="the adaptation's work folder (default OUT/work)")
    ap.add_argument("--draws", type=int, nargs="+", default=[0], help="seeds of the labelled draw (one run per seed)")
    ap.add_argument("--unlabelled", action="store_true", help="half the rest as the site's unlabelled films: "
                    "adapt also with --site-unlabelled; the other half is the test set")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    a.workdir = a.workdir or a.out / "work"
    bundle = load_bundle(a.bundle)
    model = load_torch(bundle)
    a.cache = a.cache or feature_cache(model)
    pool_ids, _ = pools()
    result = {}
    for name in a.sites.split(","):
        for seed in a.draws:
            key = name if seed == 0 else f"{name}, draw {seed}"
            result[key] = run_site(name, SITES[name], pool_ids, bundle, model, a, seed)
            print_site(key, result[key])
        if a.json:  # after every site: a run stopped later keeps what it measured
            atomic_write_json(a.json, result)


if __name__ == "__main__":
    main()
