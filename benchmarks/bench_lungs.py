"""Lung segmenter benchmark on the real masks: prints figures measured in one run.

1. Dice / IoU on the bundle's own held-out test split (duplicate groups kept on one side), overall
   and per source, at 256 x 256. Targets: >= 0.95 quex and crdvp, >= 0.90 v7.
2. Latency of one 256 x 256 image through ONNX Runtime (LungSegmenter.masks: resize down, the
   network, probabilities resized back, threshold), median and p90 of 50 calls. Target: < 30 ms.
3. A montage of overlays (green: model, red: reference outline): children (crdvp), adults of each
   source, and the held-out split's worst cases.
4. The sanity check's rate on the held-out reference masks and on the model's masks.

Usage: python benchmarks/bench_lungs.py --model MODELS/lungs [--data DIR] [--out docs/results/lungs]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "lung-masks"


def latency(seg, image: np.ndarray, reps: int = 50) -> dict:
    seg.masks(image[None])  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        seg.masks(image[None])
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return {"median_ms": round(statistics.median(times), 2), "p90_ms": round(times[int(0.9 * reps) - 1], 2),
            "reps": reps}


def pick(pairs, metrics, rng) -> list[int]:
    """Indices for the montage: 6 children, 3 quex, 3 v7 (random), then the 6 worst."""
    by_id = {i: k for k, i in enumerate(pairs.ids)}
    out = []
    for source, n in (("crdvp", 6), ("quex", 3), ("v7", 3)):
        idx = [k for k, s in enumerate(pairs.sources) if s == source]
        out += list(rng.choice(idx, min(n, len(idx)), replace=False))
    worst = [by_id[w["id"]] for w in metrics["worst"][:6]]
    return [int(k) for k in out] + [k for k in worst if k not in out]


def main() -> None:
    from covid_cxr.lungs.evaluate import dice_iou, evaluate_pairs
    from covid_cxr.lungs.data import load_pairs
    from covid_cxr.lungs.overlay import mask_overlay, montage
    from covid_cxr.lungs.segment import LungSegmenter, sanity_check
    from covid_cxr.utils import atomic_write_json

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "lungs")
    a = ap.parse_args()
    seg = LungSegmenter.from_bundle(a.model)
    meta = seg.bundle.metadata.segmentation
    pairs = load_pairs(a.data, None, only=set(meta.data["test_ids"]))
    t = time.perf_counter()
    preds = np.concatenate([seg.masks(pairs.images[i:i + 64]) for i in range(0, len(pairs.ids), 64)])
    per_image_ms = (time.perf_counter() - t) * 1000 / len(pairs.ids)
    m = evaluate_pairs(preds, pairs, worst=12)
    lat = latency(seg, pairs.images[0])
    sanity = {"reference_fail": int(sum(not sanity_check(t).ok for t in pairs.masks)),
              "model_fail": int(sum(not sanity_check(p).ok for p in preds)), "n": len(preds)}
    result = {"bundle": str(seg.bundle.path), "held_out": {k: m[k] for k in ("dice", "iou", "n", "per_source", "worst")},
              "latency_256px": lat, "batch_ms_per_image": round(per_image_ms, 2), "sanity": sanity,
              "training_s": meta.timings_s, "config": meta.config.model_dump(), "split": meta.data["counts"]}
    atomic_write_json(a.out / "bench_lungs.json", result)
    rng = np.random.default_rng(0)
    chosen = pick(pairs, m, rng)
    tiles = [mask_overlay(pairs.images[k], preds[k], pairs.masks[k]) for k in chosen]
    caps = [f"{pairs.sources[k]} {pairs.ids[k][-12:]}\nDice {dice_iou(preds[k], pairs.masks[k])[0]:.3f}" for k in chosen]
    montage(tiles, caps, a.out / "montage.png", cols=6,
            title="held-out split: model (green) vs reference outline (red); row 1: children (crdvp); last rows: worst")
    print(json.dumps(result, indent=1)[:3000])


if __name__ == "__main__":
    main()
