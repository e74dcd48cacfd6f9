"""Exact and near duplicates.

Exact duplicates (same sha256) carry no new information: the first copy (by path) stays, the others
are marked ``duplicate``. Near duplicates (perceptual hashes within `near_threshold` bits) stay, but
share a group id so that a split never puts one copy in training and another in test.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def near_pairs(hashes: list[str], threshold: int) -> list[tuple[int, int]]:
    """All index pairs whose 64-bit hex hashes differ in at most `threshold` bits (vectorised)."""
    if len(hashes) < 2 or threshold < 0:
        return []
    h = np.array([int(x, 16) for x in hashes], dtype=np.uint64)
    pairs: list[tuple[int, int]] = []
    for i in range(len(h) - 1):
        d = np.bitwise_count(h[i + 1:] ^ h[i])
        for j in np.nonzero(d <= threshold)[0]:
            pairs.append((i, i + 1 + int(j)))
    return pairs


def mark_duplicates(records: list, near_threshold: int = 4) -> dict[str, int]:
    """Set `status`/`reason` for exact copies and `group` for every record; return counts."""
    ok = [r for r in records if r.status == "ok"]
    ok.sort(key=lambda r: r.path)
    by_sha: dict[str, list] = defaultdict(list)
    for r in ok:
        by_sha[r.sha256].append(r)
    exact = 0
    conflicts = 0
    for copies in by_sha.values():
        keep = copies[0]
        labels = {c.label for c in copies}
        for c in copies[1:]:
            exact += 1
            c.status = "duplicate"
            c.reason = f"exact copy of {keep.path}"
        if len(labels) > 1:  # the same file under two classes: no label can be trusted
            conflicts += 1
            for c in copies:
                c.status = "duplicate"
                c.reason = f"same file labelled {sorted(labels)}"

    kept = [r for r in ok if r.status == "ok"]
    uf = _UnionFind(len(kept))
    pairs = near_pairs([r.phash for r in kept], near_threshold)
    for a, b in pairs:
        uf.union(a, b)
    for i, r in enumerate(kept):
        r.group = uf.find(i)
    sizes = defaultdict(int)
    for r in kept:
        sizes[r.group] += 1
    near_groups = sum(1 for s in sizes.values() if s > 1)
    cross = sum(1 for g in {r.group for r in kept if sizes[r.group] > 1}
                if len({r.label for r in kept if r.group == g}) > 1)
    return {"exact_duplicates": exact, "label_conflicts": conflicts, "near_pairs": len(pairs),
            "near_groups": near_groups, "images_in_near_groups": sum(s for s in sizes.values() if s > 1),
            "near_groups_across_classes": cross}
