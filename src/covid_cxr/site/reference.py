"""A site sample (the model's answers and image statistics on a set of images) and the bundle's
reference built from one: the validation split's sample, stored in metadata.json's `site_reference`
when the bundle is written (training, ensembles, adaptation)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from covid_cxr.bundle.schema import SiteReference
from covid_cxr.site.images import HIST_BINS, SCALARS, ImageBatch

MAX_REFERENCE = 2000  # images kept in a reference (a random subset beyond it: metadata.json stays small)
DIGITS = 5  # significant digits kept per value


@dataclass
class Sample:
    """The model's answers on a set of images (and, from files, their statistics)."""

    probs: np.ndarray  # N x C (temperature-scaled, as the bundle answers)
    ood_score: np.ndarray | None  # N, or None without a gate
    images: dict[str, np.ndarray] = field(default_factory=dict)  # statistic -> N values
    histogram: np.ndarray | None = None  # mean intensity histogram
    bit_depth: dict[str, int] = field(default_factory=dict)
    dicom: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.probs)

    @property
    def confidence(self) -> np.ndarray:
        return np.asarray(self.probs).max(axis=1)

    def predicted(self, classes: list[str]) -> dict[str, int]:
        counts = np.bincount(np.asarray(self.probs).argmax(axis=1), minlength=len(classes))
        return {c: int(k) for c, k in zip(classes, counts)}


def sample_of(probs, ood_score, batch: ImageBatch | None = None) -> Sample:
    """A Sample from the model's outputs and (optionally) the ImageBatch they came from."""
    s = Sample(np.asarray(probs, np.float64), None if ood_score is None else np.asarray(ood_score, np.float64))
    if batch is not None and batch.paths:
        s.images = {k: np.asarray(batch.stats[k], np.float64) for k in SCALARS}
        s.histogram = np.mean(batch.histograms, axis=0)
        s.bit_depth = dict(batch.bit_depth)
        s.dicom = {t: dict(c) for t, c in batch.dicom.items()}
    return s


def _round(values) -> list[float]:
    return [float(f"{v:.{DIGITS}g}") for v in np.asarray(values, np.float64)]


def build_reference(sample: Sample, classes: list[str], computed_on: str = "val split",
                    seed: int = 0, class_mix: bool = True) -> SiteReference:
    """metadata.json's `site_reference` from the validation split's sample (a random subset of
    MAX_REFERENCE images when larger); without `class_mix` when the sample's classes were chosen
    (labelled films drawn per class), so that a site's own prevalence is not called a shift."""
    keep = np.arange(sample.n)
    if sample.n > MAX_REFERENCE:
        keep = np.sort(np.random.default_rng(seed).choice(sample.n, MAX_REFERENCE, replace=False))
    images = None
    if sample.images:
        images = {**{k: _round(sample.images[k][keep]) for k in SCALARS},
                  "histogram": _round(sample.histogram if sample.histogram is not None else np.zeros(HIST_BINS)),
                  "bit_depth": sample.bit_depth, "dicom": sample.dicom}
    sub = Sample(sample.probs[keep], None if sample.ood_score is None else sample.ood_score[keep])
    return SiteReference.model_validate({
        "computed_on": computed_on, "n": len(keep), "confidence": _round(sub.confidence),
        "ood_score": None if sub.ood_score is None else _round(sub.ood_score),
        "predicted": sub.predicted(classes) if class_mix else None, "images": images})


def reference_from_files(paths, height: int, width: int, probs, ood_score, classes: list[str],
                         computed_on: str = "val split", class_mix: bool = True) -> SiteReference | None:
    """The reference of images the model has already answered (`probs`, `ood_score` in the order of
    `paths`), with their image statistics read from the files; None without images."""
    from covid_cxr.site.images import read_images

    if probs is None or not len(paths):
        return None
    batch = ImageBatch()
    for i in range(0, len(paths), 64):
        batch, _ = read_images(list(paths[i:i + 64]), height, width, batch)
    if batch.skipped:  # the answers and the statistics would no longer pair up: a bug upstream
        raise ValueError(f"reference images unreadable: {batch.skipped[:3]}")
    return build_reference(sample_of(probs, ood_score, batch), classes, computed_on, class_mix=class_mix)


def merged(ref: SiteReference, site: SiteReference) -> SiteReference:
    """The reference of an adapted model: the development reference and the site's, pooled (so a
    fresh batch from either is `fit`)."""
    a, b = ref.model_dump(), site.model_dump()
    out = {"computed_on": f"{ref.computed_on} + {site.computed_on}", "n": ref.n + site.n,
           "confidence": a["confidence"] + b["confidence"],
           "ood_score": None if a["ood_score"] is None or b["ood_score"] is None else a["ood_score"] + b["ood_score"],
           "predicted": None if a["predicted"] is None or b["predicted"] is None
           else dict(Counter(a["predicted"]) + Counter(b["predicted"])), "images": None}
    if a["images"] and b["images"]:
        ia, ib = a["images"], b["images"]
        w = ref.n / (ref.n + site.n)
        out["images"] = {**{k: ia[k] + ib[k] for k in SCALARS},
                         "histogram": _round(w * np.array(ia["histogram"]) + (1 - w) * np.array(ib["histogram"])),
                         "bit_depth": dict(Counter(ia["bit_depth"]) + Counter(ib["bit_depth"])),
                         "dicom": {t: dict(Counter(ia["dicom"].get(t, {})) + Counter(ib["dicom"].get(t, {})))
                                   for t in set(ia["dicom"]) | set(ib["dicom"])}}
    return SiteReference.model_validate(out)
