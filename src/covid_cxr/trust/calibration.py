"""Temperature scaling (Guo et al. 2017) and how to judge calibration: ECE (15 equal-width bins),
Brier score and the reliability diagram's bins.

A softmax read as "confidence" is only honest if 0.9 means right nine times in ten. One scalar T,
fitted on the validation split by minimising the negative log-likelihood, divides the logits inside
the exported model; it never changes the predicted class, only how sure the model says it is.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15
T_BOUNDS = (0.05, 20.0)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(logits))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of `labels` under softmax(logits / T)."""
    lp = log_softmax(np.asarray(logits, dtype=np.float64) / temperature)
    return float(-lp[np.arange(len(labels)), np.asarray(labels)].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising validation NLL (bounded 1-D search on log T; scipy)."""
    from scipy.optimize import minimize_scalar

    if len(labels) == 0:
        return 1.0
    lo, hi = np.log(T_BOUNDS)
    res = minimize_scalar(lambda lt: nll(logits, labels, float(np.exp(lt))), bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-4})
    t = float(np.exp(res.x))
    return t if nll(logits, labels, t) <= nll(logits, labels, 1.0) else 1.0


def reliability_bins(labels: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> list[dict]:
    """Per equal-width confidence bin: count, mean confidence, accuracy (None where empty)."""
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    idx = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    out = []
    for b in range(n_bins):
        sel = idx == b
        n = int(sel.sum())
        out.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "n": n,
                    "confidence": float(conf[sel].mean()) if n else None,
                    "accuracy": float(correct[sel].mean()) if n else None})
    return out


def ece(labels: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over bins of |accuracy - confidence| weighted by bin size."""
    bins = reliability_bins(labels, probs, n_bins)
    total = sum(b["n"] for b in bins)
    if total == 0:
        return float("nan")
    return float(sum(b["n"] * abs(b["accuracy"] - b["confidence"]) for b in bins if b["n"]) / total)


def brier(labels: np.ndarray, probs: np.ndarray) -> float:
    """Multi-class Brier score: mean over images of sum_k (p_k - 1[y = k])^2 (0 is perfect, 2 worst)."""
    probs = np.asarray(probs, dtype=np.float64)
    if len(probs) == 0:
        return float("nan")
    onehot = np.eye(probs.shape[1])[np.asarray(labels)]
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def calibration_summary(labels: np.ndarray, probs: np.ndarray) -> dict:
    """What metrics.json carries: ECE, Brier, the reliability diagram's bins."""
    return {"ece": ece(labels, probs), "brier": brier(labels, probs),
            "reliability": {"n_bins": ECE_BINS, "bins": reliability_bins(labels, probs)}}


def reliability_png(bins: list[dict], path, title: str = "") -> None:
    """The reliability diagram: accuracy against confidence per bin, the diagonal being perfect."""
    from covid_cxr.core.figures import plt, save_png

    fig, ax = plt.subplots(figsize=(4.4, 4))
    full = [b for b in bins if b["n"]]
    width = bins[0]["hi"] - bins[0]["lo"] if bins else 1 / ECE_BINS
    ax.bar([b["lo"] for b in full], [b["accuracy"] for b in full], width=width, align="edge",
           edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.scatter([b["confidence"] for b in full], [b["accuracy"] for b in full], s=[4 + b["n"] ** 0.5 * 3 for b in full],
               color="tab:red", zorder=3, label="bin (size ~ images)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or "reliability diagram")
    save_png(fig, path)
