"""Why `train --init-from` gains little with a few labels, and what pays instead (issue 16, item 5).

Proxy sites from ../shared/data/lung-masks, films whose near-duplicate group touches the
development database left out (benchmarks/site_duplicates.py): `quex` (COVID-19, Normal),
`quex+crdvp` (quex COVID-19 and Normal, crdvp children's Viral Pneumonia) and `v7+quex+crdvp`
(v7 adult COVID-19 instead). v7 and crdvp alone hold one class each: nothing to adapt a classifier
on, so they enter only through the mixed sites. Per site and draw: `--labelled` films per class
(whole near-duplicate groups) are the labelled set, the rest of that site the test set.

Every method works on the bundle's frozen features (the same numbers as the bundle's ONNX model):
- before: the bundle's head;
- LR: scikit-learn logistic regression on the labelled films' standardised features (the baseline);
- as-is: the pipeline's `--init-from` recipe: 70/15/15 split of the labelled films, Adam 1e-3,
  batch 32, <= 30 epochs, early stopping on val accuracy (patience 8), best val epoch kept;
- as-is + dev: the same with the development database mixed in (4,137 films);
- weighted: all labelled films + development films, the site's films up-weighted to half the loss;
- prior: train.adapt.fit_site_head (the bundle's head refitted on all labelled films, pulled towards
  the development head), depth `last` (last layer) or `head` (the whole head).
Figures: macro-F1 over the classes the site has, and recall per class, mean over `--draws` draws.

Usage: python benchmarks/site_adapt_heads.py --bundle MODELS/<name>/<v> [--draws 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from site_adaptation import MASKS, groups  # noqa: E402

from covid_cxr.bundle import load_bundle  # noqa: E402
from covid_cxr.core.files import atomic_write_json  # noqa: E402

DEV = REPO.parent / "shared" / "data" / "covid19-radiography"
SITES = {"quex": {"COVID-19": ("quex", "COVID-19"), "Normal": ("quex", "Normal")},
         "quex+crdvp": {"COVID-19": ("quex", "COVID-19"), "Normal": ("quex", "Normal"),
                        "Viral Pneumonia": ("crdvp", "Viral Pneumonia")},
         "v7+quex+crdvp": {"COVID-19": ("v7", "COVID-19"), "Normal": ("quex", "Normal"),
                           "Viral Pneumonia": ("crdvp", "Viral Pneumonia")}}
DEV_LABEL = {"COVID": "COVID-19"}


def pools() -> tuple[dict[tuple[str, str], list[list[str]]], dict[str, str]]:
    """(source, class) -> near-duplicate groups (lists of ids) untouched by the development database."""
    with (MASKS / "manifest.csv").open() as f:
        rows = list(csv.DictReader(f))
    g = groups(rows)
    in_dev = {g[r["id"]] for r in rows if r["in_cls_data"] == "1"}
    out: dict[tuple[str, str], dict[str, list[str]]] = {}
    for r in rows:
        if g[r["id"]] not in in_dev:
            out.setdefault((r["source"], r["class"]), {}).setdefault(g[r["id"]], []).append(r["id"])
    return {k: [v[i] for i in sorted(v)] for k, v in out.items()}, {}


def draw(site: dict, pool: dict, classes: list[str], labelled: int, seed: int):
    """(labelled ids, labels), (rest ids, labels): whole groups, `labelled` films per class at most."""
    rng = np.random.default_rng(seed)
    lab, rest = ([], []), ([], [])
    for cls, key in site.items():
        taken = 0
        for i in rng.permutation(len(pool[key])):
            members = pool[key][i]
            side = lab if taken + len(members) <= labelled else rest
            taken += len(members) if side is lab else 0
            side[0].extend(members)
            side[1].extend([classes.index(cls)] * len(members))
    return lab, rest


def halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(unlabelled, test) indices: the rest of a site (n films) split in two, seeded by the draw; the
    one split of site_adapt_backbones.py, site_label_shift.py and site_adapt_loop.py --unlabelled."""
    order = np.random.default_rng(100 + seed).permutation(n)
    return order[:n // 2], order[n // 2:]


def feature_cache(model) -> Path:
    """The feature cache of this backbone: caches are keyed by image alone, so each backbone (by its
    weights' digest) gets its own file and two bundles never read each other's features."""
    from covid_cxr.features.onnx import weights_digest

    return REPO / "runs" / "adapt-work" / f"features-{weights_digest(model.backbone)}.safetensors"


def features(bundle, model, paths: list[Path], cache_path: Path) -> np.ndarray:
    import hashlib

    from covid_cxr.features.cache import FeatureCache, extract

    items = [(p, hashlib.sha256(p.read_bytes()).hexdigest()) for p in paths]
    cache = FeatureCache(cache_path)
    return extract(model, items, bundle.input_hw[0], cache, engine="auto", label="features").numpy()


def macro(y, pred, present) -> tuple[float, dict]:
    from sklearn.metrics import f1_score, recall_score

    f1 = f1_score(y, pred, labels=present, average="macro", zero_division=0)
    rec = recall_score(y, pred, labels=present, average=None, zero_division=0)
    return float(f1), {int(c): float(r) for c, r in zip(present, rec)}


def logits(head, x) -> np.ndarray:
    head.eval()
    with torch.inference_mode():
        return head(torch.from_numpy(np.asarray(x, np.float32))).numpy()


def lr_baseline(x, y, xt, n_classes: int) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(x, y)
    return clf.classes_[clf.predict_proba(xt).argmax(1)]


def as_is(head0, x, y, seed: int, dev=None) -> torch.nn.Module:
    """The pipeline's recipe on the labelled films (70/15/15 stratified; dev films split alike)."""
    import copy

    from sklearn.model_selection import train_test_split

    torch.manual_seed(seed)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.3, stratify=y, random_state=seed)
    va, _ = train_test_split(te, test_size=0.5, stratify=y[te], random_state=seed)
    xtr, ytr, xva, yva = x[tr], y[tr], x[va], y[va]
    if dev is not None:
        dtr, dte = train_test_split(np.arange(len(dev[1])), test_size=0.3, stratify=dev[1], random_state=seed)
        dva = dte[: len(dte) // 2]
        xtr, ytr = np.concatenate([xtr, dev[0][dtr]]), np.concatenate([ytr, dev[1][dtr]])
        xva, yva = np.concatenate([xva, dev[0][dva]]), np.concatenate([yva, dev[1][dva]])
    head = copy.deepcopy(head0)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(xtr.astype(np.float32)), torch.from_numpy(ytr)
    best, best_acc, wait = copy.deepcopy(head.state_dict()), -1.0, 0
    for _ in range(30):
        head.train()
        for b in torch.randperm(len(yt)).split(32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(head(xt[b]), yt[b]).backward()
            opt.step()
        acc = float((logits(head, xva).argmax(1) == yva).mean())
        if acc > best_acc:
            best, best_acc, wait = copy.deepcopy(head.state_dict()), acc, 0
        else:
            wait += 1
            if wait >= 8:
                break
    head.load_state_dict(best)
    return head


def methods(head0, x, y, dev, seed: int):
    """name -> a function of the test features giving predictions."""
    from covid_cxr.train.adapt import fit_site_head

    n_classes = head0.net[-1].out_features
    yield "before", lambda xt: logits(head0, xt).argmax(1)
    yield "LR (site images only)", lambda xt: lr_baseline(x, y, xt, n_classes)
    h = as_is(head0, x, y, seed)
    yield "as-is --init-from, site only", lambda xt: logits(h, xt).argmax(1)
    h2 = as_is(head0, x, y, seed, dev)
    yield "as-is --init-from, site + dev", lambda xt: logits(h2, xt).argmax(1)
    hw = fit_site_head(head0, x, y, depth="head", prior=0.0, dev=dev, seed=seed)
    yield "weighted: site = dev in the loss", lambda xt: logits(hw, xt).argmax(1)
    for depth in ("last", "head"):
        for prior in (0.0, 1e-2, 1e-1):
            hp = fit_site_head(head0, x, y, depth=depth, prior=prior, seed=seed)
            yield f"site head, depth {depth}, prior {prior:g}", (lambda hp: lambda xt: logits(hp, xt).argmax(1))(hp)


def run_site(name, site, pool, classes, fx, head0, dev, a) -> dict:
    present = sorted(classes.index(c) for c in site)
    table: dict[str, list] = {}
    counts = None
    for seed in range(a.draws):
        (li, ly), (ri, ry) = draw(site, pool, classes, a.labelled, seed)
        x, xt, y, yt = fx(li), fx(ri), np.array(ly), np.array(ry)
        counts = {"labelled": len(y), "rest": len(yt)}
        for m, predict in methods(head0, x, y, dev, seed):
            table.setdefault(m, []).append(macro(yt, predict(xt), present))
    out = {}
    for m, runs in table.items():
        f1 = np.array([r[0] for r in runs])
        rec = {classes[c]: float(np.mean([r[1][c] for r in runs])) for c in present}
        out[m] = {"macro_f1": float(f1.mean()), "macro_f1_sd": float(f1.std()), "recall": rec}
    return {"counts": counts, "methods": out}


def print_site(name: str, r: dict) -> None:
    c = r["counts"]
    print(f"\n### {name}: {c['labelled']} labelled films, evaluated on the other {c['rest']}\n")
    classes = list(next(iter(r["methods"].values()))["recall"])
    print("| method | macro-F1 (sd over draws) | " + " | ".join(f"recall {k}" for k in classes) + " |")
    print("|---|---|" + "---|" * len(classes))
    for m, v in r["methods"].items():
        print(f"| {m} | {v['macro_f1']:.3f} ({v['macro_f1_sd']:.3f}) | "
              + " | ".join(f"{v['recall'][k]:.2f}" for k in classes) + " |")


def main() -> None:
    from covid_cxr.models.loading import load_torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--labelled", type=int, default=20)
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--cache", type=Path, help="feature cache (default: one per backbone, feature_cache)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    bundle = load_bundle(a.bundle)
    model = load_torch(bundle)
    a.cache = a.cache or feature_cache(model)
    classes = list(bundle.classes)
    pool, _ = pools()
    ids = sorted({i for s in SITES.values() for k in s.values() for g in pool[k] for i in g})
    t = time.perf_counter()
    feats = features(bundle, model, [MASKS / "images" / f"{i}.png" for i in ids], a.cache)
    with (DEV / "manifest.csv").open() as f:
        dev_rows = list(csv.DictReader(f))
    dev_x = features(bundle, model, [DEV / r["path"] for r in dev_rows], a.cache)
    dev = (dev_x, np.array([classes.index(DEV_LABEL.get(r["label"], r["label"])) for r in dev_rows]))
    print(f"features: {len(ids)} site + {len(dev_rows)} development films, {time.perf_counter() - t:.0f} s")
    row = {i: k for k, i in enumerate(ids)}
    result = {}
    for name, site in SITES.items():
        result[name] = run_site(name, site, pool, classes, lambda li: feats[[row[i] for i in li]],
                                model.head, dev, a)
        print_site(name, result[name])
    if a.json:
        atomic_write_json(a.json, result)


if __name__ == "__main__":
    main()
