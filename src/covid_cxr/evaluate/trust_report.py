"""The trust figures in a report: calibration before/after temperature, the out-of-distribution
rate, and the markdown lines (with the reliability diagram) that evaluate/report.py appends."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from covid_cxr.evaluate.metrics import compute_metrics
from covid_cxr.trust.calibration import brier, ece, reliability_png
from covid_cxr.trust.fit import apply_temperature


def add_trust_metrics(y: np.ndarray, probs: np.ndarray, classes, trust=None) -> dict:
    """Metrics of the temperature-scaled probabilities (what the bundle answers), with ECE and Brier
    before scaling beside them and the test split's out-of-distribution rate."""
    scaled = apply_temperature(probs, trust.temperature) if trust is not None else probs
    m = compute_metrics(y, scaled, classes)
    if trust is not None:
        m["temperature"] = trust.temperature
        m["before_temperature"] = {"ece": ece(y, probs), "brier": brier(y, probs)}
        rate = ((trust.info.get("ood") or {}).get("test_accept_rate") if trust.ood is not None else None)
        if rate is not None:  # measured when the gate was fitted, on the stage statistics it reads
            m["ood_rate"] = float(1 - rate)
    return m


def ci_text(e: dict, key: str) -> str:
    ci = (e.get("ci") or {}).get(key)
    return f" ({ci[0]:.2f}–{ci[1]:.2f})" if ci else ""


def trust_md(m: dict, out: Path, title: str) -> str:
    """Markdown: macro-F1 with its interval, ECE and Brier (before/after temperature), OOD rate,
    and the reliability diagram (written next to the report)."""
    lines = []
    if "ci" in m:
        lo, hi = m["ci"]["accuracy"]
        flo, fhi = m["ci"]["macro_f1"]
        lines.append(f"\nBootstrap 95% intervals ({m['ci']['method']}): accuracy {lo:.3f}–{hi:.3f}; "
                     f"macro-F1 **{m['macro_f1']:.3f}** ({flo:.3f}–{fhi:.3f}).\n")
    if "ece" in m:
        line = f"\nCalibration: ECE (15 bins) **{m['ece']:.3f}**, Brier **{m['brier']:.3f}**"
        if "before_temperature" in m:
            b = m["before_temperature"]
            line += f" with temperature {m['temperature']:.3f} (before: ECE {b['ece']:.3f}, Brier {b['brier']:.3f})"
        lines.append(line + ".\n")
        reliability_png(m["reliability"]["bins"], out / "reliability.png", f"{title}: reliability")
        lines.append("\n![reliability diagram](reliability.png)\n")
    if m.get("ood_rate") is not None:
        lines.append(f"\nOut of distribution (the model's gate says: unlike its training images): "
                     f"**{m['ood_rate']:.1%}** of these images.\n")
    return "".join(lines)
