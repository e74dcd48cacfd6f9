"""Image/mask pair folders laid out like ../shared/data/lung-masks (`images/<id>.png`,
`masks/<id>.png`, optional `manifest.csv` with `source` and `near_dup_ids`), the group-aware split
(each near-duplicate group on one side, stratified by source) and the augmented training set."""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from covid_cxr.data.decode import DecodeError, IMAGE_SUFFIXES, load_for_model
from covid_cxr.core.errors import DataError, DataNotFound
from covid_cxr.core.files import file_sha256

SPLITS = ("train", "val", "test")


@dataclass
class LungPairs:
    """Pairs held in memory at one size: images float32 [0, 1], masks bool, both N x S x S."""

    root: Path
    ids: list[str]
    sources: list[str]
    images: np.ndarray
    masks: np.ndarray
    groups: list[int]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    manifest_sha256: str = ""

    def subset(self, index) -> LungPairs:
        index = list(index)
        return LungPairs(self.root, [self.ids[i] for i in index], [self.sources[i] for i in index],
                         self.images[index], self.masks[index], [self.groups[i] for i in index],
                         manifest_sha256=self.manifest_sha256)


def read_manifest(root: Path) -> dict[str, dict[str, str]]:
    """id -> manifest row ({} when the folder has no manifest.csv)."""
    f = root / "manifest.csv"
    if not f.is_file():
        return {}
    with f.open(newline="", encoding="utf-8") as fh:
        return {row["id"]: row for row in csv.DictReader(fh)}


def duplicate_groups(ids: list[str], manifest: dict[str, dict[str, str]]) -> list[int]:
    """Union-find over `near_dup_ids`: one group number per id (partners outside `ids` still join)."""
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        parent.setdefault(a, a)
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for i in ids:
        for j in (manifest.get(i, {}).get("near_dup_ids") or "").split():
            parent[find(i)] = find(j)
    roots: dict[str, int] = {}
    return [roots.setdefault(find(i), len(roots)) for i in ids]


def pair_files(root: Path) -> list[tuple[str, Path, Path]]:
    """(id, image, mask) for every image that has a mask of the same stem."""
    images, masks = root / "images", root / "masks"
    if not images.is_dir() or not masks.is_dir():
        raise DataNotFound(f"{root}: expected images/ and masks/ folders (laid out like lung-masks)")
    by_stem = {m.stem: m for m in masks.iterdir() if m.suffix.lower() in IMAGE_SUFFIXES}
    out = [(f.stem, f, by_stem[f.stem]) for f in sorted(images.iterdir())
           if f.suffix.lower() in IMAGE_SUFFIXES and f.stem in by_stem]
    if not out:
        raise DataError(f"{root}: no image with a mask of the same name")
    return out


def load_pairs(root: str | Path, size: int | None = None, max_images: int | None = None, seed: int = 0,
               only: set[str] | None = None) -> LungPairs:
    """Decode every pair (or those in `only`), resized to `size` or kept at the image's own size;
    unreadable ones are skipped with the reason."""
    root = Path(root)
    files = [f for f in pair_files(root) if only is None or f[0] in only]
    if max_images and len(files) > max_images:
        keep = np.sort(np.random.default_rng(seed).choice(len(files), max_images, replace=False))
        files = [files[i] for i in keep]
    manifest = read_manifest(root)
    ids, imgs, masks, skipped = [], [], [], []
    for pid, img_f, mask_f in files:
        try:
            # size None: the first readable image's size; others are resized to it (a batch is one size)
            img = load_for_model(img_f, size, size) if size else _native(img_f, imgs[0].shape if imgs else None)
            mask = load_for_model(mask_f, img.shape[0], img.shape[1]) >= 0.5
        except DecodeError as exc:
            skipped.append((str(img_f), str(exc)))
            continue
        ids.append(pid)
        imgs.append(img)
        masks.append(mask)
    if not ids:
        raise DataError(f"{root}: no readable image/mask pair")
    sources = [manifest.get(i, {}).get("source") or "all" for i in ids]
    sha = file_sha256(root / "manifest.csv") if manifest else ""
    return LungPairs(root, ids, sources, np.stack(imgs), np.stack(masks), duplicate_groups(ids, manifest),
                     skipped, sha)


def _native(path: Path, shape: tuple[int, int] | None) -> np.ndarray:
    from covid_cxr.data.decode import decode_file, resize

    pixels = decode_file(path).pixels.astype(np.float32)
    return resize(pixels, *shape) if shape is not None and pixels.shape != shape else pixels


def group_split(pairs: LungPairs, fractions=(0.7, 0.1, 0.2), seed: int = 0) -> dict[str, list[int]]:
    """split -> indices. Whole duplicate groups, shuffled with `seed`, dealt out per source (a group
    goes to its first member's source) so every source is in every split in about `fractions`."""
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(pairs.groups):
        members[g].append(i)
    by_source: dict[str, list[int]] = defaultdict(list)
    for g, idx in members.items():
        by_source[pairs.sources[idx[0]]].append(g)
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    cuts = np.cumsum(fractions)[:-1] / np.sum(fractions)
    for source in sorted(by_source):
        groups = by_source[source]
        total, done = sum(len(members[g]) for g in groups), 0
        for k in rng.permutation(len(groups)):
            split = SPLITS[int(np.searchsorted(cuts, done / total, side="right"))]
            out[split] += members[groups[k]]
            done += len(members[groups[k]])
    if not out["train"] or not out["val"]:
        raise DataError(f"{pairs.root}: too few pairs to split ({len(pairs.ids)})")
    return {s: sorted(v) for s, v in out.items()}
