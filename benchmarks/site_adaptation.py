"""Site adaptation shown on a "new site" built from what is offline (issue 9, item 6).

The new site: films of ../shared/data/lung-masks that are NOT in covid19-radiography
(`in_cls_data` = 0): COVID-19 and Normal from COVID-QU-Ex (other hospitals, letterboxed to a square
canvas: another "machine"), Viral Pneumonia from the paediatric set's films left out of our
sample. `--labelled` per class (default 40: "tens per class") form the site's labelled folder;
every other such film forms a larger held-out site test folder. Near-duplicate groups
(`near_dup_ids`) stay on one side. Folders hold symbolic links (no copy of the data).

Then: the bundle as it was, evaluated on the held-out site folder; `train --init-from BUNDLE --data
SITE` (and with `--data ORIGINAL` mixed in); the adapted bundles evaluated on the same folder. The
adapted bundle's own report also compares before/after on the site's test split.

Usage: python benchmarks/site_adaptation.py --bundle MODELS/<name> --out /work/runs-9/site
           [--original ../shared/data/covid19-radiography] [--labelled 40]
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MASKS = REPO.parent / "shared" / "data" / "lung-masks"
CLASSES = {"COVID-19": ("quex", "COVID-19"), "Normal": ("quex", "Normal"), "Viral Pneumonia": ("crdvp", "Viral Pneumonia")}


def groups(rows: list[dict]) -> dict[str, str]:
    """id -> group representative (near_dup_ids, transitively)."""
    parent = {r["id"]: r["id"] for r in rows}

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for r in rows:
        for j in r["near_dup_ids"].split():
            if j in parent:
                parent[find(j)] = find(r["id"])
    return {i: find(i) for i in parent}


def build_site(out: Path, labelled: int, seed: int = 0) -> tuple[Path, Path]:
    with (MASKS / "manifest.csv").open() as f:
        rows = [r for r in csv.DictReader(f)]
    g = groups(rows)
    in_cls = {g[r["id"]] for r in rows if r["in_cls_data"] == "1"}  # a group touching our data: left out
    rng = np.random.default_rng(seed)
    site, test = out / "site-labelled", out / "site-test"
    for cls, (source, label) in CLASSES.items():
        pool = [r for r in rows if r["source"] == source and r["class"] == label and g[r["id"]] not in in_cls]
        reps = sorted({g[r["id"]] for r in pool})
        taken = 0
        for i in rng.permutation(len(reps)):
            members = [r for r in pool if g[r["id"]] == reps[i]]
            dest = site if taken + len(members) <= labelled else test
            taken += len(members) if dest is site else 0
            for r in members:
                link = dest / cls / f"{r['id']}.png"
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    link.symlink_to((MASKS / "images" / f"{r['id']}.png").resolve())
    return site, test


def evaluate(bundle: Path, folder: Path, out: Path) -> dict:
    from covid_cxr.bundle import load_bundle
    from covid_cxr.evaluate.external import evaluate_folder

    return evaluate_folder(load_bundle(bundle), folder, out, progress=False).model_dump()


def line(label: str, m: dict) -> str:
    c = m["per_class"]["COVID-19"]
    per = ", ".join(f"{k} {v['recall']:.2f}" for k, v in m["per_class"].items())
    return (f"| {label} | {m['n']} | {m['accuracy']:.3f} ({m['accuracy_ci95'][0]:.3f}-{m['accuracy_ci95'][1]:.3f}) "
            f"| {m['macro_f1']:.3f} | {c['recall']:.3f} | {per} |")


def main() -> None:
    import logging

    from covid_cxr.train.fit import TrainConfig, train

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--original", type=Path, default=REPO.parent / "shared" / "data" / "covid19-radiography")
    ap.add_argument("--labelled", type=int, default=40)
    ap.add_argument("--workdir", type=Path, help="feature cache to share (default OUT/work)")
    a = ap.parse_args()
    site, test = build_site(a.out, a.labelled)
    lines = ["| model | n | accuracy (95% CI) | macro-F1 | COVID-19 recall | recall per class |", "|---|---|---|---|---|---|",
             line("before: the bundle as it was", evaluate(a.bundle, test, a.out / "eval-before"))]
    runs = {"site only": [site], "site + original": [site, a.original]}
    for label, data in runs.items():
        t = time.perf_counter()
        cfg = TrainConfig(init_from=str(a.bundle), balance="weights", lr_find=False, progress=False,
                          name=f"adapted-{len(data)}")
        r = train(data if len(data) > 1 else data[0], a.out / "models", cfg, workdir=a.workdir or a.out / "work")
        took = time.perf_counter() - t
        lines.append(line(f"after, {label} ({took:.0f} s)", evaluate(r.bundle_path, test, a.out / f"eval-{len(data)}")))
        b = r.metrics.before_adaptation
        print(f"{label}: its own site test split n={r.metrics.n}: before acc {b.accuracy:.3f} -> after "
              f"{r.metrics.accuracy:.3f}; report {r.bundle_path / 'report' / 'metrics.md'}", flush=True)
    print(f"held-out site folder: {test}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
