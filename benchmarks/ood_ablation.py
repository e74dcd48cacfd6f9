"""How the OOD gate's stages and combination were chosen (issue 8): on the dev sets of
bench_ood.py (`dev_sets`: noise with another seed, other blank levels and gradients, the validation
split's X-rays rotated, inverted and cropped), never on its test sets. Each candidate is fitted as
the bundle's gate is (train split; each block over its 95 % validation quantile; threshold accepting
95 % of the validation split) and its dev-set rejection rates printed.

Usage: python benchmarks/ood_ablation.py --model MODELS/<name> --data DIR [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from covid_cxr.models.loading import load_torch
from bench_ood import SIZE, dev_sets, split_images


def stage_stats(model, prepared, threads: int):
    """StageStats with every feature_info stage (the deepest too) of train, val and the dev sets."""
    from covid_cxr.data.dataset import labels_of
    from covid_cxr.trust.stages import stage_layout, stage_runner

    indices = tuple(range(len(model.backbone.feature_info)))
    run = stage_runner(model, indices, SIZE, Path(tempfile.mkdtemp()) / "stages.onnx", threads)

    def feats(x):
        return np.concatenate([run(np.ascontiguousarray(x[i:i + 32, None])) for i in range(0, len(x), 32)])

    train = (feats(split_images(prepared, "train")), labels_of(prepared, "train"))
    return stage_layout(model, indices), train, {k: feats(x) for k, x in dev_sets(prepared).items()}


def candidate_rates(layout, train, sets, blocks: list[str], combine: str) -> dict[str, float]:
    """Rejection rate per set of the gate on `blocks` (names in `layout`), summed or maxed."""
    from covid_cxr.trust.ood import fit_ood

    val = next(iter(sets.values()))  # the validation split comes first in dev_sets
    stats = fit_ood(train, val, [b for b in layout if b[0] in blocks])
    if combine == "max":
        def score(x):
            return np.max([s.score(x) for s in stats.stages], axis=0)
        stats.threshold = float(np.quantile(score(val), 0.95))
        return {k: float((score(x) > stats.threshold).mean()) for k, x in sets.items()}
    return {k: float((~stats.accepts(x)).mean()) for k, x in sets.items()}


def main() -> None:
    from covid_cxr.bundle import load_bundle
    from covid_cxr.data import prepare

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    b = load_bundle(args.model)
    cfg = b.metadata.training.config
    prepared = prepare(args.data, cfg.classes, cfg.balance, cfg.max_per_class, cfg.seed, progress=False)
    layout, train, sets = stage_stats(load_torch(b), prepared, args.threads)
    names = [n for n, _, _ in layout]  # pooled, then the stages, the deepest last
    candidates = [([n], "sum") for n in names] + [(names[:-1], c) for c in ("max", "sum")] + [(names, c) for c in ("max", "sum")]
    print("| blocks | combine | " + " | ".join(sets) + " |\n|---|---|" + "---|" * len(sets))
    for blocks, combine in candidates:
        r = candidate_rates(layout, train, sets, blocks, combine)
        print(f"| {' + '.join(blocks)} | {combine if len(blocks) > 1 else '-'} | " + " | ".join(f"{v:.1%}" for v in r.values()) + " |")


if __name__ == "__main__":
    main()
