"""Selective prediction: what the model is worth when it may decline the images it is least sure
of (Geifman & El-Yaniv 2017). Images are ranked by confidence (the largest class probability);
the risk-coverage curve is the error rate among the k most confident images against k / n, its
area (AURC, lower is better) summarises it, and the accuracy at 90 % and 80 % coverage is what a
reader gets when 10 % or 20 % of films go to a human. With an out-of-distribution gate, the
accuracy among the images it accepts is reported beside it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from covid_cxr.core.results import Selective

COVERAGES = (0.9, 0.8)


def risk_coverage(y_true, probs) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, risk) at every k = 1..n, most confident first (ties: stable order)."""
    y_true, probs = np.asarray(y_true), np.asarray(probs, np.float64)
    order = np.argsort(-probs.max(axis=1), kind="stable")
    wrong = (probs.argmax(axis=1) != y_true)[order]
    k = np.arange(1, len(wrong) + 1)
    return k / len(wrong), np.cumsum(wrong) / k


def selective_metrics(y_true, probs, accepted=None) -> Selective | None:
    """AURC, the accuracy (and confidence threshold) at each of COVERAGES, and, given the gate's
    `accepted` (bool per image), the accuracy among accepted images and their share."""
    y_true, probs = np.asarray(y_true), np.asarray(probs, np.float64)
    if not len(y_true):
        return None
    cov, risk = risk_coverage(y_true, probs)
    conf = np.sort(probs.max(axis=1))[::-1]
    out = {"aurc": float(risk.mean()), "full_coverage_accuracy": float(1 - risk[-1]), "at_coverage": {}}
    for c in COVERAGES:
        k = max(1, int(np.ceil(c * len(y_true))))
        out["at_coverage"][f"{c:.2f}"] = {"accuracy": float(1 - risk[k - 1]), "images": k,
                                          "min_confidence": float(conf[k - 1])}
    if accepted is not None:
        accepted = np.asarray(accepted, bool)
        right = probs.argmax(axis=1) == y_true
        out["gate"] = {"accepted_share": float(accepted.mean()),
                       "accuracy_accepted": float(right[accepted].mean()) if accepted.any() else None,
                       "accuracy_rejected": float(right[~accepted].mean()) if (~accepted).any() else None}
    return Selective.model_validate(out)


def selective_md(s: Selective | None) -> str:
    """The report's section."""
    if not s:
        return ""
    lines = ["\n## Selective prediction (most confident first)\n",
             f"- AURC {s.aurc:.4f} (area under the risk-coverage curve; lower is better); "
             f"accuracy at full coverage {s.full_coverage_accuracy:.3f}"]
    for c, e in s.at_coverage.items():
        lines.append(f"- coverage {float(c):.0%}: accuracy {e.accuracy:.3f} on {e.images} images "
                     f"(confidence >= {e.min_confidence:.3f})")
    g = s.gate
    if g:
        acc = "–" if g.accuracy_accepted is None else f"{g.accuracy_accepted:.3f}"
        lines.append(f"- out-of-distribution gate: accepts {g.accepted_share:.1%}; accuracy among accepted {acc}")
    return "\n".join(lines) + "\n"


def risk_coverage_png(y_true, probs, path: Path, title: str = "") -> None:
    from covid_cxr.core.figures import plt, save_png

    cov, risk = risk_coverage(y_true, probs)
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    ax.plot(cov, risk)
    for c in COVERAGES:
        ax.axvline(c, color="grey", lw=0.6, ls="--")
    ax.set_xlabel("coverage (share of images answered)")
    ax.set_ylabel("risk (error rate among answered)")
    ax.set_title(title or "risk-coverage", fontsize=9)
    save_png(fig, path)
