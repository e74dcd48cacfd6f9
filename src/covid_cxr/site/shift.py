"""Two-sample tests of a site against the bundle's reference: is this batch of images drawn from
the population the model was validated on?

Kolmogorov-Smirnov (scipy.stats.ks_2samp) on every continuous signal (ood_score, confidence, the
image statistics), chi-square on the 2 x k tables of counts (predicted class mix, bit depth;
scipy.stats.chi2_contingency, which also accounts for the reference being a sample). Why scipy and
not alibi-detect: these univariate tests on ~10 numbers per image are what alibi-detect's
KSDrift/ChiSquareDrift run underneath (scipy), without its TensorFlow/PyTorch dependency, which the
torch-free server must not take; the p-values, effect sizes and words stay ours to report.

One verdict per batch: the signals are corrected for multiple testing with Holm's step-down method,
which bounds the family-wise false-alarm rate at `alpha` under any dependence between the tests
(ours are strongly dependent: confidence, mix and ood_score come from one forward pass). Benjamini-
Hochberg bounds the false discovery rate instead, which is the wrong quantity for a single
"shift detected" alarm, and needs positive dependence to hold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import stats

from covid_cxr.bundle.schema import SiteReference
from covid_cxr.site import ALPHA, MIN_IMAGES
from covid_cxr.site.reference import Sample

FIT, SHIFT, TOO_FEW = "fit", "shift detected", "too few images"

# statistic -> (what it is, word when the site is lower, word when higher, format of its median)
_WORDS = {
    "ood_score": ("ood_score", "lie closer to the training images", "lie further from the training images", ".2f"),
    "confidence": ("confidence", "get less confident answers", "get more confident answers", ".2f"),
    "side": ("shorter side (px)", "are smaller files", "are larger files", ".0f"),
    "aspect": ("width / height", "are narrower", "are wider", ".2f"),
    "brightness": ("mean brightness", "are darker", "are brighter", ".2f"),
    "contrast": ("contrast (pixel s.d.)", "have lower contrast", "have higher contrast", ".3f"),
    "sharpness": ("sharpness", "are blurrier", "are sharper or noisier", ".4f"),
    "border": ("border brightness", "have darker borders (padding?)", "have brighter borders (crops, text?)", ".2f"),
}


@dataclass
class Signal:
    name: str
    test: str
    p_value: float
    effect: float
    effect_name: str
    site: float | dict
    reference: float | dict
    words: str
    p_adjusted: float = 1.0
    moved: bool = False


@dataclass
class ShiftResult:
    verdict: str
    n: int
    alpha: float
    signals: list[Signal] = field(default_factory=list)
    reference_n: int = 0

    @property
    def moved(self) -> list[Signal]:
        return [s for s in self.signals if s.moved]

    @property
    def p_value(self) -> float:
        """The family's smallest Holm-adjusted p-value (1 when nothing was tested)."""
        return min((s.p_adjusted for s in self.signals), default=1.0)

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "n": self.n, "reference_n": self.reference_n, "alpha": self.alpha,
                "p_value": self.p_value, "correction": "Holm", "signals": [asdict(s) for s in self.signals]}


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values (same order as given)."""
    p = np.asarray(p_values, np.float64)
    order = np.argsort(p)
    m = len(p)
    adj = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adj
    return out


def ks_signal(name: str, site, ref) -> Signal:
    site, ref = np.asarray(site, np.float64), np.asarray(ref, np.float64)
    res = stats.ks_2samp(site, ref)
    label, low, high, fmt = _WORDS[name]
    ms, mr = float(np.median(site)), float(np.median(ref))
    direction = low if ms < mr else high
    words = f"the site's images {direction} (median {label} {ms:{fmt}} against {mr:{fmt}} in the reference)"
    return Signal(name, "Kolmogorov-Smirnov", float(res.pvalue), float(res.statistic), "KS D", ms, mr, words)


def counts_signal(name: str, site: dict[str, int], ref: dict[str, int]) -> Signal | None:
    """Chi-square on the 2 x k table of counts; None when it has fewer than two categories."""
    keys = sorted(k for k in set(site) | set(ref) if site.get(k, 0) + ref.get(k, 0) > 0)
    if len(keys) < 2:
        return None
    table = np.array([[ref.get(k, 0) for k in keys], [site.get(k, 0) for k in keys]], np.float64)
    chi2, p, _, _ = stats.chi2_contingency(table, correction=False)
    n = table.sum()
    v = float(np.sqrt(chi2 / (n * (min(table.shape) - 1)))) if n else 0.0
    share_s = {k: float(table[1, i] / max(1, table[1].sum())) for i, k in enumerate(keys)}
    share_r = {k: float(table[0, i] / max(1, table[0].sum())) for i, k in enumerate(keys)}
    k = max(keys, key=lambda c: abs(share_s[c] - share_r[c]))
    what = "are predicted" if name == "predicted class mix" else "have bit depth"
    words = f"{share_s[k]:.0%} of the site's images {what} {k} against {share_r[k]:.0%} in the reference"
    return Signal(name, "chi-square", float(p), v, "Cramér's V", share_s, share_r, words)


def signals_of(ref: SiteReference, sample: Sample, classes: list[str], images: bool = True) -> list[Signal]:
    """Every test the reference and the sample both allow."""
    out = [ks_signal("confidence", sample.confidence, ref.confidence)]
    if ref.ood_score is not None and sample.ood_score is not None:
        out.insert(0, ks_signal("ood_score", sample.ood_score, ref.ood_score))
    if ref.predicted is not None:  # an adapted bundle's reference has no mix to compare (build_reference)
        out.append(counts_signal("predicted class mix", sample.predicted(classes), ref.predicted))
    if images and ref.images is not None and sample.images:
        ri = ref.images.model_dump()
        out += [ks_signal(k, sample.images[k], ri[k]) for k in ("side", "aspect", "brightness", "contrast",
                                                                   "sharpness", "border")]
        out.append(counts_signal("bit depth", sample.bit_depth, ref.images.bit_depth))
    return [s for s in out if s is not None]


def compare(ref: SiteReference, sample: Sample, classes: list[str], alpha: float = ALPHA,
            images: bool = True, min_images: int = MIN_IMAGES) -> ShiftResult:
    """The verdict on `sample` against `ref`: FIT, SHIFT (a Holm-adjusted p-value <= alpha) or TOO_FEW."""
    if sample.n < min_images:
        return ShiftResult(TOO_FEW, sample.n, alpha, reference_n=ref.n)
    signals = signals_of(ref, sample, classes, images)
    for s, p in zip(signals, holm([s.p_value for s in signals])):
        s.p_adjusted, s.moved = float(p), bool(p <= alpha)
    verdict = SHIFT if any(s.moved for s in signals) else FIT
    return ShiftResult(verdict, sample.n, alpha, signals, ref.n)


def summary_words(result: ShiftResult) -> str:
    """One sentence: what moved, in words."""
    if result.verdict == TOO_FEW:
        return f"{result.n} images: too few to test (at least {MIN_IMAGES})."
    if not result.moved:
        return f"No signal moved at the {result.alpha:g} level (Holm-corrected): the site looks like the reference."
    return "Moved: " + "; ".join(s.words for s in sorted(result.moved, key=lambda s: s.p_adjusted)) + "."
