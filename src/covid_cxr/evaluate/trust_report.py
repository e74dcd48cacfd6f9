"""The trust figures in a report: calibration before/after temperature, the out-of-distribution
rate, and the markdown lines (with the reliability diagram) that evaluate/report.py appends."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from covid_cxr.core.results import CalibrationFigures, ClassMetrics, Metrics
from covid_cxr.evaluate.metrics import compute_metrics
from covid_cxr.trust.calibration import brier, ece, reliability_png
from covid_cxr.trust.fit import apply_temperature


def add_trust_metrics(y: np.ndarray, probs: np.ndarray, classes, trust=None) -> Metrics:
    """Metrics of the temperature-scaled probabilities (what the bundle answers), with ECE and Brier
    before scaling beside them and the test split's out-of-distribution rate."""
    scaled = apply_temperature(probs, trust.temperature) if trust is not None else probs
    m = compute_metrics(y, scaled, classes)
    if trust is None:
        return m
    rate = ((trust.info.get("ood") or {}).get("test_accept_rate") if trust.ood is not None else None)
    return m.model_copy(update={  # the gate's rate: measured when it was fitted, on the statistics it reads
        "temperature": trust.temperature, "ood_rate": None if rate is None else float(1 - rate),
        "before_temperature": CalibrationFigures(ece=ece(y, probs), brier=brier(y, probs))})


def ci_text(e: ClassMetrics, key: str) -> str:
    ci = getattr(e.ci, key) if e.ci is not None else None
    return f" ({ci[0]:.2f}–{ci[1]:.2f})" if ci else ""


def trust_md(m: Metrics, out: Path, title: str) -> str:
    """Markdown: macro-F1 with its interval, ECE and Brier (before/after temperature), OOD rate,
    and the reliability diagram (written next to the report)."""
    lines = []
    if m.ci is not None:
        (lo, hi), (flo, fhi) = m.ci.accuracy, m.ci.macro_f1
        lines.append(f"\nBootstrap 95% intervals ({m.ci.method}): accuracy {lo:.3f}–{hi:.3f}; "
                     f"macro-F1 **{m.macro_f1:.3f}** ({flo:.3f}–{fhi:.3f}).\n")
    if m.ece is not None:
        line = f"\nCalibration: ECE (15 bins) **{m.ece:.3f}**, Brier **{m.brier:.3f}**"
        if m.before_temperature is not None:
            b = m.before_temperature
            line += f" with temperature {m.temperature:.3f} (before: ECE {b.ece:.3f}, Brier {b.brier:.3f})"
        lines.append(line + ".\n")
        reliability_png([b.model_dump() for b in m.reliability.bins], out / "reliability.png", f"{title}: reliability")
        lines.append("\n![reliability diagram](reliability.png)\n")
    if m.ood_rate is not None:
        lines.append(f"\nOut of distribution (the model's gate says: unlike its training images): "
                     f"**{m.ood_rate:.1%}** of these images.\n")
    return "".join(lines)
