"""Several dataset folders as one manifest (`--data A --data B ...`, any layouts).

Each record keeps its `source` (the folder's name, made unique), paths become relative to the
folders' common parent, and duplicates are marked across folders too: the same film published
twice (a frequent case with public COVID-19 collections) must not land in train and test.
Splits are then stratified by class *and* source (data/split.py), and reports give per-source
metrics, because a model can be good on one hospital's films and poor on another's.
"""

from __future__ import annotations

import os
from pathlib import Path

from covid_cxr.data.manifest import Manifest, build_manifest


def source_names(dirs: list[Path]) -> list[str]:
    """Folder names, made unique with the parent's name (then a number) where two clash."""
    names = [d.name for d in dirs]
    for i, d in enumerate(dirs):
        if names.count(d.name) > 1:
            names[i] = f"{d.parent.name}/{d.name}"
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out


def build_sources_manifest(data_dirs, classes=None, near_threshold: int = 4, progress: bool = True,
                           allow_missing: bool = False) -> Manifest:
    """One manifest over every folder; a single folder gives exactly `build_manifest`'s result.
    `allow_missing`: a folder may lack some of `classes` (a site adapted on)."""
    from covid_cxr.data.dedupe import mark_duplicates

    dirs = [Path(d) for d in ([data_dirs] if isinstance(data_dirs, (str, Path)) else data_dirs)]
    parts = [build_manifest(d, classes, near_threshold=near_threshold, progress=progress, allow_missing=allow_missing)
             for d in dirs]
    if len(parts) == 1:
        return parts[0]
    root = Path(os.path.commonpath([str(m.root) for m in parts]))
    records = []
    for m, name in zip(parts, source_names([m.root for m in parts])):
        prefix = m.root.relative_to(root)
        for r in m.records:
            r.path, r.source = (prefix / r.path).as_posix(), name
            records.append(r)
    dedupe = mark_duplicates(records, near_threshold=near_threshold)
    dedupe["exact_duplicates"] += sum(m.dedupe.get("exact_duplicates", 0) for m in parts)
    excluded: dict[str, int] = {}
    for m in parts:
        for c, n in m.excluded_classes.items():
            excluded[c] = excluded.get(c, 0) + n
    return Manifest(root, " + ".join(sorted({m.layout for m in parts})), parts[0].classes, records, excluded, dedupe)
