"""Image files named on a command line: files as given, folders expanded; output names that don't collide."""

from __future__ import annotations

from pathlib import Path

from covid_cxr.data.decode import IMAGE_SUFFIXES


def collect_images(paths: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files as given, folders expanded (recursively, sorted) to their PNG / JPEG / DICOM files.

    Returns (images, problems) where problems are (path, reason) for arguments that are neither."""
    images: list[Path] = []
    problems: list[tuple[Path, str]] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                problems.append((p, "folder holds no PNG, JPEG or DICOM files"))
            images.extend(found)
        elif p.is_file():
            images.append(p)
        else:
            problems.append((p, "no such file or folder"))
    seen: set[Path] = set()
    unique = []
    for f in images:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique, problems


def unique_stem(path: Path, used: set[str]) -> str:
    """The file's stem, or stem-2, stem-3, ... when an earlier file of the same run took it."""
    stem, n = path.stem, 2
    while stem in used:
        stem = f"{path.stem}-{n}"
        n += 1
    used.add(stem)
    return stem
