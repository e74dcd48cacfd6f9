"""Fit the trust layer at training time: the temperature from the validation split's pooled features
(the cached ones when the backbone was frozen, else computed with the trained model), the
out-of-distribution gate from every split's stage statistics (trust/stages.py, cached per image)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from covid_cxr.trust.calibration import fit_temperature, nll, softmax
from covid_cxr.trust.ood import OODStats, fit_ood, ood_summary

if TYPE_CHECKING:  # stages.py needs torch; the ONNX-only readers import this module
    from covid_cxr.trust.stages import StageFeatures


@dataclass
class Trust:
    temperature: float
    ood: OODStats | None
    info: dict  # metadata.json's "trust" section
    val_probs: np.ndarray | None = None  # the validation split's temperature-scaled probabilities (site reference)
    val_ood: np.ndarray | None = None  # and its ood_score
    site_sample: object | None = None  # a site's unlabelled films as answered (site.reference.Sample): its reference


def split_features(model, prepared, size: int, cached: dict | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """split -> (pooled features N x F, labels N) as numpy."""
    import torch

    from covid_cxr.data.dataset import labels_of
    from covid_cxr.features.cache import extract

    out = {}
    for split in ("train", "val", "test"):
        if cached is not None:
            f, y = cached[split]
            out[split] = (f.numpy(), y.numpy())
            continue
        items = [(prepared.manifest.root / r.path, r.sha256) for r in prepared.splits[split]]
        feats = extract(model, items, size, None, progress=False) if items else torch.zeros(0, model.num_features)
        out[split] = (feats.numpy(), labels_of(prepared, split))
    return out


def head_logits(model, feats: np.ndarray) -> np.ndarray:
    import torch

    model.eval()
    with torch.inference_mode():
        return model.head(torch.from_numpy(np.asarray(feats, np.float32))).numpy()


def fit_trust(model, feats: dict[str, tuple[np.ndarray, np.ndarray]], stages: StageFeatures) -> Trust:
    """Temperature on the validation split's pooled-feature logits; the Mahalanobis gate on the
    train split's `stages` (StageStats), threshold on val's."""
    val_f, val_y = feats["val"]
    logits = head_logits(model, val_f)
    t = fit_temperature(logits, val_y)
    calibration = {"temperature": t, "fitted_on": "val split", "val_nll_before": nll(logits, val_y, 1.0),
                   "val_nll_after": nll(logits, val_y, t)}
    stats = None
    info: dict = {"calibration": calibration}
    x = stages.splits
    if len(x["val"]) and len(x["train"]) >= 2:
        stats = fit_ood((x["train"], feats["train"][1]), x["val"], stages.layout, stages.indices)
        info["ood"] = ood_summary(stats, x["val"], x["test"], len(x["train"]))
    val_ood = stats.score(x["val"]) if stats is not None else None
    return Trust(t, stats, info, softmax(logits / t) if len(logits) else None, val_ood)


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) from softmax(logits): log p equals the logits up to a per-row constant."""
    from covid_cxr.trust.calibration import softmax

    return softmax(np.log(np.clip(np.asarray(probs, np.float64), 1e-300, None)) / temperature)
