"""The site check's picture: site vs reference histograms of every signal, one panel each."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from covid_cxr.bundle.schema import SiteReference
from covid_cxr.core.figures import plt, save_png
from covid_cxr.site.reference import Sample
from covid_cxr.site.shift import ShiftResult


def _panels(ref: SiteReference, sample: Sample) -> list[tuple[str, np.ndarray, np.ndarray]]:
    out = [("confidence", sample.confidence, np.asarray(ref.confidence))]
    if ref.ood_score is not None and sample.ood_score is not None:
        out.insert(0, ("ood_score", sample.ood_score, np.asarray(ref.ood_score)))
    if ref.images is not None and sample.images:
        ri = ref.images.model_dump()
        out += [(k, sample.images[k], np.asarray(ri[k])) for k in ("brightness", "contrast", "sharpness", "border",
                                                                   "side")]
    return out


def shift_png(ref: SiteReference, sample: Sample, classes: list[str], result: ShiftResult, path: Path) -> None:
    """Histograms (density) of the site over the reference, the predicted class mix as bars; a
    panel's title says its Holm-adjusted p-value and is red when the signal moved."""
    panels = _panels(ref, sample)
    by_name = {s.name: s for s in result.signals}
    cols = 3
    rows = -(-(len(panels) + 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows))
    axes = np.atleast_1d(axes).ravel()
    for ax, (name, site, reference) in zip(axes, panels):
        lo, hi = np.nanmin(np.r_[site, reference]), np.nanmax(np.r_[site, reference])
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 25)
        ax.hist(reference, bins, density=True, alpha=0.5, label=f"reference ({len(reference)})", color="tab:blue")
        ax.hist(site, bins, density=True, alpha=0.5, label=f"site ({len(site)})", color="tab:orange")
        _title(ax, name, by_name.get(name))
        ax.legend(fontsize=7)
    ax = axes[len(panels)]
    ref_mix = ref.predicted or {}  # none in an adapted bundle's reference: the site's bars alone
    ref_total = max(1, sum(ref_mix.values()))
    site_mix = sample.predicted(classes)
    x = np.arange(len(classes))
    if ref_mix:
        ax.bar(x - 0.2, [ref_mix.get(c, 0) / ref_total for c in classes], 0.4, label="reference")
    ax.bar(x + 0.2, [site_mix[c] / max(1, sample.n) for c in classes], 0.4, label="site")
    ax.set_xticks(x, classes, rotation=20, fontsize=8)
    _title(ax, "predicted class mix", by_name.get("predicted class mix"))
    ax.legend(fontsize=7)
    for ax in axes[len(panels) + 1:]:
        ax.axis("off")
    fig.suptitle(f"site check: {result.verdict} ({result.n} images)")
    fig.tight_layout()
    save_png(fig, path)


def _title(ax, name: str, signal) -> None:
    if signal is None:
        ax.set_title(name, fontsize=9)
        return
    ax.set_title(f"{name}: p(Holm) {signal.p_adjusted:.2g}", fontsize=9, color="red" if signal.moved else "black")
