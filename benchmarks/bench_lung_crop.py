"""Lung-only input (`train --lung-crop`) measured: the study's protocol (219 images per class,
efficientnet_lite0, frozen backbone + head) trained on one prepared split three times, with whole
images, cropped to the lungs' box, and masked outside the lungs. For each: test accuracy and
COVID-19 recall, and where Grad-CAM looks on the test split (share of the map inside the lung
fields of the image the model saw, mean per class; the strongest zone's counts). Also the zone
naming on one test image per class with the whole-image model (a montage).

Usage: python benchmarks/bench_lung_crop.py --lungs MODELS/lungs [--data DIR] [--models OUT]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
from covid_cxr.models.loading import load_torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "covid19-radiography"


def where_it_looks(bundle_path: Path, prepared, mode: str, lungs: Path) -> tuple[dict, list]:
    """Grad-CAM inside-lung share per class and zone counts on the test split, and per-image rows."""
    from covid_cxr.bundle import load_bundle
    from covid_cxr.data.decode import load_batch
    from covid_cxr.explain.gradcam import Explainer
    from covid_cxr.lungs.crop import batch_transform
    from covid_cxr.lungs.segment import segmenter_for
    from covid_cxr.lungs.zones import cam_zones

    b = load_bundle(bundle_path)
    explainer = Explainer(load_torch(b), layer=b.metadata.architecture.cam_layer)
    seg, crop = segmenter_for(lungs), batch_transform(mode, str(lungs))
    recs = prepared.splits["test"]
    h, w = b.input_hw
    pixels = load_batch([prepared.manifest.root / r.path for r in recs], h, w)
    seen = crop(pixels) if crop else pixels
    masks = seg.masks(seen)
    rows = []
    for r, px, m in zip(recs, seen, masks):
        e = explainer.explain(px)[0]
        z = cam_zones(e.cam, m)
        rows.append({"path": r.path, "label": r.label, "pred": b.classes[e.predicted_index], "inside": z.inside,
                     "strongest": z.strongest, "summary": z.summary, "px": px, "cam": e.cam})
    explainer.close()
    per_class = {c: round(float(np.mean([x["inside"] for x in rows if x["label"] == c])), 3) for c in b.classes}
    return {"inside_mean": round(float(np.mean([x["inside"] for x in rows])), 3), "inside_per_class": per_class,
            "strongest_zone_counts": dict(Counter(x["strongest"] for x in rows).most_common())}, rows


def zone_montage(rows: list, classes: list[str], path: Path) -> list[dict]:
    from covid_cxr.explain.gradcam import overlay
    from covid_cxr.explain.lung_overlay import montage

    picks = []
    for c in classes:
        right = [x for x in rows if x["label"] == c and x["pred"] == c] or [x for x in rows if x["label"] == c]
        picks.append(right[0])
    montage([overlay(x["px"], x["cam"]) for x in picks],
            [f"{x['label']} (pred {x['pred']})\n" + x["summary"].replace("; ", "\n") for x in picks], path,
            cols=len(picks),
            title="Grad-CAM by lung zone (patient's right = image left)")
    return [{k: x[k] for k in ("path", "label", "pred", "summary")} for x in picks]


def trained(a, cfg, prepared) -> tuple[Path, dict, dict]:
    """Train the mode's model, or with --reuse take the newest bundle of that name if its config
    matches (a run trained beforehand with `covid-cxr train ... --name lite0-<mode>`)."""
    from covid_cxr.bundle import BundleError, load_bundle
    from covid_cxr.core.config import TrainConfig
    from covid_cxr.train.fit import train

    cfg = TrainConfig.model_validate({**cfg.model_dump(), "progress": False})
    if a.reuse:
        try:
            b = load_bundle(a.models / cfg.name)
            if b.metadata.training.config.run_id() == cfg.run_id():
                t = b.metadata.training
                return b.path, b.metadata.test_metrics.model_dump(), t.timings_s
        except BundleError:
            pass
    r = train(a.data, a.models, cfg, prepared=prepared)
    return r.bundle_path, r.metrics.model_dump(), r.timings


def main() -> None:
    from covid_cxr.data import prepare
    from covid_cxr.core.config import STUDY_MAX_PER_CLASS, TrainConfig
    from covid_cxr.core.files import atomic_write_json

    ap = argparse.ArgumentParser()
    ap.add_argument("--lungs", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--models", type=Path, default=Path("runs/lung-crop"))
    ap.add_argument("--modes", default="none,box,mask")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "lungs")
    ap.add_argument("--max-per-class", type=int, default=STUDY_MAX_PER_CLASS)
    ap.add_argument("--reuse", action="store_true", help="take an existing bundle of the same config")
    a = ap.parse_args()
    base = TrainConfig(max_per_class=a.max_per_class, progress=False)
    prepared = prepare(a.data, None, base.balance, base.max_per_class, base.seed, progress=False)
    results = {}
    for mode in a.modes.split(","):
        cfg = base.model_copy(update={"lung_crop": mode, "lungs": None if mode == "none" else str(a.lungs),
                                      "name": f"lite0-{mode}"})
        path, m, timings = trained(a, cfg, prepared)
        looks, rows = where_it_looks(path, prepared, mode, a.lungs)
        results[mode] = {"accuracy": round(m["accuracy"], 4), "accuracy_ci95": m["accuracy_ci95"], "n": m["n"],
                         "recall": {c: round(e["recall"], 3) for c, e in m["per_class"].items()},
                         "train_s": round(timings["total"], 1), "gradcam": looks, "bundle": str(path)}
        if mode == "none":
            results["zone_examples"] = zone_montage(rows, list(prepared.classes), a.out / "zones.png")
        print(mode, json.dumps(results[mode]), flush=True)
    atomic_write_json(a.out / "lung_crop.json", results)


if __name__ == "__main__":
    main()
