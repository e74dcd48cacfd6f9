"""Is `quex` (COVID-QU-Ex, in ../shared/data/lung-masks) a different site from the development
database, or the same population? (issue 16: `site check` flags quex in 10 % of 20-film batches
where v7 and crdvp are flagged in 100 %.)

Three looks, per source and class of the lung-mask collection, against covid19-radiography:
- exact copies: sha256 of the file bytes, and sha256 of the decoded pixels;
- near copies: the best Pearson correlation of a 32 x 32 down-sampled film (content box only)
  with any development film, and an 8 x 8 average hash at Hamming distance <= 4;
- the share of near copies beside the share of the full database the development sample holds
  (a random draw of the same database overlaps the sample at that share).

With `--bundle`: a classifier two-sample test on the bundle's frozen features (cross-validated ROC
AUC of a logistic regression telling the source's films, near copies left out, from the development
films of the same class; 0.5 = indistinguishable), beside the same test between two random halves
of the development class (the null) and v7 / crdvp (sites known to differ).

Usage: python benchmarks/site_duplicates.py [--bundle MODELS/<name>/<v>] [--json FILE]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
from pathlib import Path

import numpy as np

from covid_cxr.core.files import atomic_write_json
from covid_cxr.data.decode import decode_file, resize

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SIDE = 32  # down-sampled side of the pixel comparison
NEAR = 0.98  # correlation at or above it: the same film (re-encoded, re-sized)
# The full COVID-19 Radiography Database (later release) per class; the development sample holds
# 1500 / 1500 / 1137 of them (its README).
FULL_DB = {"COVID-19": 3616, "Normal": 10192, "Viral Pneumonia": 1345}
SAMPLE = {"COVID-19": 1500, "Normal": 1500, "Viral Pneumonia": 1137}


def pixels(path: Path, box: tuple[int, int, int, int] | None = None) -> tuple[str, np.ndarray, int]:
    """(sha256 of the decoded 8-bit pixels, z-scored SIDE x SIDE vector, 64-bit average hash)."""
    x = decode_file(path).pixels
    digest = hashlib.sha256(np.round(x * 255).astype(np.uint8).tobytes()).hexdigest()
    if box is not None:
        x0, y0, w, h = box
        x = x[y0:y0 + h, x0:x0 + w]
    small = resize(x, SIDE, SIDE).ravel().astype(np.float64)
    small = (small - small.mean()) / (small.std() + 1e-9)
    a = resize(x, 8, 8).ravel()
    ahash = int("".join("1" if v > a.mean() else "0" for v in a), 2)
    return digest, small, ahash


def development() -> dict:
    root = SHARED / "covid19-radiography"
    with (root / "manifest.csv").open() as f:
        rows = list(csv.DictReader(f))
    out = {"file": {r["sha256"] for r in rows}, "pixel": set(), "vec": [], "ahash": []}
    for r in rows:
        d, v, h = pixels(root / r["path"])
        out["pixel"].add(d)
        out["vec"].append(v)
        out["ahash"].append(h)
    out["vec"] = np.stack(out["vec"]) / (SIDE * SIDE)
    out["ahash"] = np.array(out["ahash"], dtype=np.uint64)
    return out


def hamming_min(h: int, table: np.ndarray) -> int:
    x = np.bitwise_xor(table, np.uint64(h))
    return int(min(bin(int(v)).count("1") for v in x))


def compare_source(rows: list[dict], dev: dict) -> dict:
    """Per row: exact file / pixel copy, best correlation, nearest average-hash distance."""
    masks = SHARED / "lung-masks"
    out = []
    for r in rows:
        path = masks / "images" / f"{r['id']}.png"
        file_hash = hashlib.sha256(path.read_bytes()).hexdigest()
        box = tuple(int(v) for v in r["content_box"].split(","))
        d, v, h = pixels(path, box)
        corr = float((dev["vec"] @ v).max())
        out.append({"file": file_hash in dev["file"], "pixel": d in dev["pixel"], "corr": corr,
                    "ahash": hamming_min(h, dev["ahash"]), "flag": r["in_cls_data"] == "1"})
    return summarise(out, rows[0]["class"])


def summarise(out: list[dict], cls: str) -> dict:
    n = len(out)
    near = [o["corr"] >= NEAR for o in out]
    others = np.array([o["corr"] for o, k in zip(out, near) if not k])
    s = {"n": n, "exact_file": sum(o["file"] for o in out), "exact_pixels": sum(o["pixel"] for o in out),
         "near_corr": int(sum(near)), "ahash_le4": sum(o["ahash"] <= 4 for o in out),
         "manifest_in_cls_data": sum(o["flag"] for o in out),
         "agree_with_manifest": sum(k == o["flag"] for o, k in zip(out, near)),
         "best_corr_of_the_rest_median": float(np.median(others)) if len(others) else None}
    if cls in FULL_DB:
        s["expected_share_if_same_database"] = SAMPLE[cls] / FULL_DB[cls]
    return s


def c2st(a: np.ndarray, b: np.ndarray, seed: int = 0) -> float:
    """Cross-validated ROC AUC of a (strongly regularised) logistic regression telling a from b."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = np.concatenate([a, b]), np.r_[np.zeros(len(a)), np.ones(len(b))]
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=3000))
    p = cross_val_predict(clf, x, y, cv=StratifiedKFold(5, shuffle=True, random_state=seed), method="predict_proba")
    return float(roc_auc_score(y, p[:, 1]))


def separability(bundle_path: Path) -> dict:
    """source/class -> (AUC against the development class, AUC of two development halves), frozen features."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from site_adapt_heads import MASKS, feature_cache, features, pools

    from covid_cxr.bundle import load_bundle
    from covid_cxr.models.loading import load_torch

    b = load_bundle(bundle_path)
    model = load_torch(b)
    cache = feature_cache(model)
    with (SHARED / "covid19-radiography" / "manifest.csv").open() as f:
        dev = list(csv.DictReader(f))
    pool, _ = pools()
    rng, out = np.random.default_rng(0), {}
    for src, cls, dev_cls in (("quex", "COVID-19", "COVID"), ("quex", "Normal", "Normal"), ("v7", "COVID-19", "COVID"),
                              ("crdvp", "Viral Pneumonia", "Viral Pneumonia")):
        d = features(b, model, [SHARED / "covid19-radiography" / r["path"] for r in dev if r["label"] == dev_cls], cache)
        s = features(b, model, [MASKS / "images" / f"{i}.png" for g in pool[(src, cls)] for i in g], cache)
        idx = rng.permutation(len(d))
        out[f"{src}/{cls}"] = {"n": len(s), "auc_vs_development": c2st(s, d[idx[:3 * len(s)]]),
                               "auc_development_halves": c2st(d[idx[:len(d) // 2]], d[idx[len(d) // 2:]])}
        print(f"{src}/{cls}: {len(s)} films, AUC against development {dev_cls} "
              f"{out[f'{src}/{cls}']['auc_vs_development']:.3f} (two development halves: "
              f"{out[f'{src}/{cls}']['auc_development_halves']:.3f})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, help="also the two-sample test on this bundle's frozen features")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    dev = development()
    with (SHARED / "lung-masks" / "manifest.csv").open() as f:
        rows = list(csv.DictReader(f))
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["source"], r["class"]), []).append(r)
    result = {f"{s}/{c}": compare_source(g, dev) for (s, c), g in sorted(groups.items())}
    print(f"| source/class | n | exact file | exact pixels | corr >= {NEAR} | aHash <= 4 | share near | "
          "share if drawn from the same database | median best corr of the rest |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k, s in result.items():
        exp = s.get("expected_share_if_same_database")
        rest = s["best_corr_of_the_rest_median"]
        print(f"| {k} | {s['n']} | {s['exact_file']} | {s['exact_pixels']} | {s['near_corr']} | {s['ahash_le4']} | "
              f"{s['near_corr'] / s['n']:.1%} | {'' if exp is None else f'{exp:.1%}'} | "
              f"{'' if rest is None else f'{rest:.3f}'} |")
    if a.bundle:
        result["separability"] = separability(a.bundle)
    if a.json:
        atomic_write_json(a.json, result)


if __name__ == "__main__":
    main()
