"""Dice and IoU of lung masks: per image, overall (mean over images) and per `source`."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from covid_cxr.core.results import MaskMetrics


def dice_iou(pred: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two bool masks (both empty: 1, 1: nothing to find, nothing found)."""
    pred, true = np.asarray(pred, bool), np.asarray(true, bool)
    inter, total = np.logical_and(pred, true).sum(), pred.sum() + true.sum()
    if total == 0:
        return 1.0, 1.0
    union = total - inter
    return float(2 * inter / total), float(inter / union)


def _summary(values: list[tuple[float, float]]) -> dict:
    d = np.array([v[0] for v in values])
    i = np.array([v[1] for v in values])
    return {"dice": float(d.mean()), "iou": float(i.mean()), "dice_median": float(np.median(d)),
            "dice_min": float(d.min()), "n": len(values)}


def evaluate_pairs(pred_masks: np.ndarray, pairs, worst: int = 8) -> MaskMetrics:
    """Dice and IoU (overall, per source, the worst images) of predicted masks against
    `pairs.masks` (same order and size)."""
    per_image = [dice_iou(p, t) for p, t in zip(pred_masks, pairs.masks)]
    by_source: dict[str, list] = defaultdict(list)
    for src, v in zip(pairs.sources, per_image):
        by_source[src].append(v)
    out = _summary(per_image)
    out["per_source"] = {s: _summary(v) for s, v in sorted(by_source.items())}
    order = np.argsort([v[0] for v in per_image])[:worst]
    out["worst"] = [{"id": pairs.ids[k], "source": pairs.sources[k], "dice": round(per_image[k][0], 4)} for k in order]
    return MaskMetrics.model_validate(out)


def evaluate_folder(segmenter, root, batch: int = 64, only: set[str] | None = None
                    ) -> tuple[MaskMetrics, list[tuple[str, str]]]:
    """A bundle's masks against a folder laid out like lung-masks, at the images' own size.
    Pairs of another size than the first are resized to it; returns (metrics, skipped files with reasons)."""
    from covid_cxr.data.lung_masks import load_pairs

    pairs = load_pairs(root, None, only=only)
    preds = np.concatenate([segmenter.masks(pairs.images[i:i + batch]) for i in range(0, len(pairs.ids), batch)])
    return evaluate_pairs(preds, pairs), pairs.skipped

