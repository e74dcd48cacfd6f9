"""One call from a dataset folder to everything training needs: manifest, selection, splits, stats."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from covid_cxr.data.manifest import Manifest, Record
from covid_cxr.data.split import SPLITS, select, stratified_group_split
from covid_cxr.data.stats import mean_std
from covid_cxr.core.errors import DataError
from covid_cxr.core.config import BALANCE_CHOICES



@dataclass
class PreparedData:
    manifest: Manifest
    splits: dict[str, list[Record]]  # train/val/test -> records
    mean: float
    std: float
    balance: str
    max_per_class: int | None
    seed: int
    fractions: tuple[float, float, float]
    class_weights: list[float] | None = None  # for --balance weights, in class order
    dedupe: dict[str, int] = field(default_factory=dict)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.manifest.classes

    def counts(self) -> dict[str, dict[str, int]]:
        return {s: {c: sum(r.label == c for r in rs) for c in self.classes} for s, rs in self.splits.items()}

    def source_counts(self) -> dict[str, dict[str, dict[str, int]]] | None:
        """source -> split -> class -> images, when the data came from several folders."""
        names = sorted({r.source for rs in self.splits.values() for r in rs})
        if len(names) < 2:
            return None
        return {n: {s: {c: sum(r.label == c and r.source == n for r in rs) for c in self.classes}
                    for s, rs in self.splits.items()} for n in names}

    def label_index(self, rec: Record) -> int:
        return self.classes.index(rec.label)

    def describe(self) -> dict:
        """The training-set description stored in a bundle's metadata."""
        return {
            "dataset_root": str(self.manifest.root),
            "layout": self.manifest.layout,
            "manifest_sha256": self.manifest.digest(),
            "files_found": len(self.manifest.records),
            "files_skipped": sum(r.status == "skipped" for r in self.manifest.records),
            "exact_duplicates_removed": sum(r.status == "duplicate" for r in self.manifest.records),
            "duplicates": self.dedupe,
            "balance": self.balance,
            "max_per_class": self.max_per_class,
            "seed": self.seed,
            "split_fractions": list(self.fractions),
            "counts": self.counts(),
            "sources": self.source_counts(),
            "class_weights": self.class_weights,
            "normalisation": {"mean": self.mean, "std": self.std, "computed_on": "train split"},
        }


def prepare(data_dir: str | Path | list, classes=None, balance: str = "undersample",
            max_per_class: int | None = None, seed: int = 0,
            fractions=(0.70, 0.15, 0.15), near_threshold: int = 4,
            progress: bool = True, manifest: Manifest | None = None, allow_missing: bool = False) -> PreparedData:
    """`allow_missing`: some classes may have no images (a site adapting a bundle whose classes are
    fixed: a children's hospital sends no adult COVID-19 films), not all of them."""
    if balance not in BALANCE_CHOICES:
        raise DataError(f"--balance must be one of {BALANCE_CHOICES}, got {balance!r}")
    from covid_cxr.data.sources import build_sources_manifest

    man = manifest or build_sources_manifest(data_dir, classes, near_threshold=near_threshold, progress=progress,
                                             allow_missing=allow_missing)
    ok = man.ok
    missing = [c for c in man.classes if not any(r.label == c for r in ok)]
    if missing and (not allow_missing or len(missing) == len(man.classes)):
        raise DataError(f"no usable images for class(es) {missing} in {man.root}")
    chosen = select(ok, balance=balance, max_per_class=max_per_class, seed=seed)
    split = stratified_group_split(chosen, fractions, seed=seed)
    splits = {s: sorted((r for r in chosen if split.assignment[r.path] == s), key=lambda r: r.path)
              for s in SPLITS}
    for s in SPLITS:
        if not splits[s]:
            raise DataError(f"the {s} split is empty: too few images ({len(chosen)}) for fractions {fractions}")
    mean, std = mean_std(splits["train"])
    weights = None
    if balance == "weights":  # inverse frequency, normalised to mean 1 (sklearn's "balanced")
        n = Counter(r.label for r in splits["train"])
        total = len(splits["train"])
        weights = [total / (len(man.classes) * max(n[c], 1)) for c in man.classes]
    return PreparedData(man, splits, mean, std, balance, max_per_class, seed, tuple(fractions), weights, man.dedupe)
