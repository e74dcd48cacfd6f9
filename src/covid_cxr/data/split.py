"""Balancing and the group-aware, stratified, seeded train/val/test split.

Both work on duplicate groups, never on single images, so near-duplicates land in one split.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from covid_cxr.core.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass
class SplitResult:
    assignment: dict[str, str]  # record path -> split
    counts: dict[str, dict[str, int]]  # split -> class -> n


def _groups_by_class(records, key=lambda r: r.label) -> dict:
    """key (class) -> group id -> records. A group spanning keys goes to its majority key's pool."""
    members: dict[int, list] = defaultdict(list)
    for r in records:
        members[r.group].append(r)
    out: dict = defaultdict(dict)
    for g, rs in members.items():
        label = Counter(key(r) for r in rs).most_common(1)[0][0]
        out[label][g] = rs
    return out


def _stratum(r) -> tuple[str, str]:
    """Splits are stratified by class and data source (one source: by class alone, as before)."""
    return (r.label, getattr(r, "source", ""))


def select(records, balance: str = "none", max_per_class: int | None = None, seed: int = 0):
    """Apply `--max-per-class` and `--balance undersample` (whole groups, seeded); returns records."""
    rng = np.random.default_rng(seed)
    pools = _groups_by_class(records)
    counts = Counter(r.label for r in records)
    target = {c: n for c, n in counts.items()}
    if balance == "undersample":
        smallest = min(counts.values())
        target = {c: smallest for c in counts}
    if max_per_class:
        target = {c: min(n, max_per_class) for c, n in target.items()}
    # Whole groups in one seeded random order; a group is taken only if every class it touches
    # still has room, so the per-class targets are met exactly even with cross-class groups.
    groups = [g for c in sorted(pools) for g in pools[c].values()]
    taken: Counter = Counter()
    chosen = []
    for i in rng.permutation(len(groups)):
        need = Counter(r.label for r in groups[i])
        if all(taken[c] + n <= target[c] for c, n in need.items()):
            chosen += groups[i]
            taken.update(need)
    return chosen


def stratified_group_split(records, fractions=(0.70, 0.15, 0.15), seed: int = 0) -> SplitResult:
    """Per class and source, shuffle the groups and fill test, then val, to their share; the rest
    is train."""
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise DataError(f"split fractions must sum to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    counts: dict[str, dict[str, int]] = {s: Counter() for s in SPLITS}
    for c, pool in sorted(_groups_by_class(records, _stratum).items()):
        groups = list(pool.values())
        total = sum(len(g) for g in groups)
        want = {"test": round(total * fractions[2]), "val": round(total * fractions[1])}
        filled = {"test": 0, "val": 0}
        for i in rng.permutation(len(groups)):
            g = groups[i]
            split = next((s for s in ("test", "val") if filled[s] + len(g) <= want[s] or
                          (filled[s] < want[s] and len(g) == 1)), "train")
            if split != "train":
                filled[split] += len(g)
            for r in g:
                assignment[r.path] = split
                counts[split][r.label] += 1
    return SplitResult(assignment, {s: dict(counts[s]) for s in SPLITS})
