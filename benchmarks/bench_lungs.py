"""Lung segmenter benchmark on the real masks: prints figures measured in one run.

1. Dice / IoU on the bundle's own held-out test split (duplicate groups kept on one side), overall
   and per source, at 256 x 256. Targets: >= 0.95 quex and crdvp, >= 0.90 v7.
2. Latency of one 256 x 256 image through ONNX Runtime (LungSegmenter.masks: resize down, the
   network, probabilities resized back, threshold), median and p90 of 50 calls. Target: < 30 ms.
3. A montage of overlays (green: model, red: reference outline): children (crdvp), adults of each
   source, and the held-out split's worst cases.
4. The sanity check's rate on the held-out reference masks and on the model's masks.

--latency-only: instead, the time of each step of LungSegmenter.masks on one image (resize down,
network, resize up, threshold, blobs) and masks() per ONNX Runtime setting (threads x spinning).

Usage: python benchmarks/bench_lungs.py --model MODELS/lungs [--data DIR] [--out docs/results/lungs] [--latency-only]
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


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(times), 3)


def breakdown(seg, image: np.ndarray, reps: int = 50) -> dict:
    """Median ms of each step of LungSegmenter.masks on one image, through the functions it calls."""
    from covid_cxr.lungs.segment import THRESHOLD, _as_batch, grow, shrink, two_largest

    x = _as_batch(image[None])
    small = shrink(x, seg.size)
    probs = seg._run(small)
    big = grow(probs, *x.shape[1:])
    mask = big[0] >= THRESHOLD
    steps = {"as_batch": lambda: _as_batch(image[None]), "resize_down": lambda: shrink(x, seg.size),
             "network": lambda: seg._run(small), "resize_up": lambda: grow(probs, *x.shape[1:]),
             "threshold": lambda: big >= THRESHOLD, "two_largest": lambda: two_largest(mask),
             "masks_total": lambda: seg.masks(image[None])}
    out = {k: _median_ms(f, reps) for k, f in steps.items()}
    out["not_network"] = round(out["masks_total"] - out["network"], 3)
    return out


def session_variants(bundle_path: Path, image: np.ndarray, reps: int = 50) -> dict:
    """masks() latency per ONNX Runtime setting: intra-op threads (0: ORT's default, all cores)
    x spinning (idle threads busy-wait for work: faster alone, costly on a loaded machine)."""
    from covid_cxr.lungs.segment import LungSegmenter

    out = {}
    for threads in (0, 1, 2):
        for spinning in (True, False):
            seg = LungSegmenter(LungSegmenter.from_bundle(bundle_path).bundle, threads, spinning)
            seg.masks(image[None])
            out[f"threads={threads} spinning={'on' if spinning else 'off'}"] = latency(seg, image, reps)
    return out


def latency_only(model: Path, data: Path, out: Path) -> None:
    """--latency-only: the step breakdown and the session settings, with the load average around them."""
    import os

    from covid_cxr.data.lung_masks import load_pairs
    from covid_cxr.lungs.segment import LungSegmenter
    from covid_cxr.core.files import atomic_write_json

    image = load_pairs(data, None, max_images=3).images[0]
    seg = LungSegmenter.from_bundle(model)
    result = {"load_before": os.getloadavg(), "image": list(image.shape), "breakdown_default_session": breakdown(seg, image),
              "breakdown_1_thread": breakdown(LungSegmenter(seg.bundle, 1), image),
              "sessions": session_variants(model, image), "load_after": os.getloadavg()}
    atomic_write_json(out / "bench_lungs_latency.json", result)
    print(json.dumps(result, indent=1))


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
    from covid_cxr.evaluate.lungs import dice_iou, evaluate_pairs
    from covid_cxr.data.lung_masks import load_pairs
    from covid_cxr.explain.lung_overlay import mask_overlay, montage
    from covid_cxr.lungs.segment import LungSegmenter, sanity_check
    from covid_cxr.core.files import atomic_write_json

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "lungs")
    ap.add_argument("--latency-only", action="store_true", help="only the latency breakdown and session settings")
    a = ap.parse_args()
    if a.latency_only:
        return latency_only(a.model, a.data, a.out)
    seg = LungSegmenter.from_bundle(a.model)
    meta = seg.bundle.metadata.segmentation
    pairs = load_pairs(a.data, None, only=set(meta.data.test_ids))
    t = time.perf_counter()
    preds = np.concatenate([seg.masks(pairs.images[i:i + 64]) for i in range(0, len(pairs.ids), 64)])
    per_image_ms = (time.perf_counter() - t) * 1000 / len(pairs.ids)
    m = evaluate_pairs(preds, pairs, worst=12).model_dump()
    lat = latency(seg, pairs.images[0])
    sanity = {"reference_fail": int(sum(not sanity_check(t).ok for t in pairs.masks)),
              "model_fail": int(sum(not sanity_check(p).ok for p in preds)), "n": len(preds)}
    result = {"bundle": str(seg.bundle.path), "held_out": {k: m[k] for k in ("dice", "iou", "n", "per_source", "worst")},
              "latency_256px": lat, "batch_ms_per_image": round(per_image_ms, 2), "sanity": sanity,
              "training_s": meta.timings_s, "config": meta.config.model_dump(), "split": meta.data.counts}
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
