"""Find the labelled files in a dataset folder, whatever release of the database it came from.

Supported layouts (detected per class folder, so mixed trees work too):
- first release:  ``COVID-19/COVID-19 (1).png``, ``NORMAL/NORMAL (1).png``, ``Viral Pneumonia/...``
- later releases: ``COVID/images/COVID-1.png`` (``masks/`` ignored), ``Lung_Opacity/`` left out
  unless asked for
- plain one-folder-per-class: ``<class>/<anything>/<file>``
A single wrapper folder (``COVID-19_Radiography_Dataset/``) is descended into.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from covid_cxr.core.errors import DataNotFound

CLASS_NAMES: tuple[str, ...] = ("COVID-19", "Normal", "Viral Pneumonia")

_ALIASES = {
    "covid19": "COVID-19",
    "covid": "COVID-19",
    "covid 19": "COVID-19",
    "normal": "Normal",
    "viral pneumonia": "Viral Pneumonia",
    "pneumonia viral": "Viral Pneumonia",
    "lung opacity": "Lung_Opacity",
}
_IGNORED_DIRS = {"masks", "mask", "__macosx"}


def normalise_class(name: str) -> str:
    """Map a folder name to its canonical class name (``COVID``/``covid-19`` -> ``COVID-19``)."""
    key = re.sub(r"[\s_\-]+", " ", name.strip().lower())
    if key in _ALIASES:
        return _ALIASES[key]
    if key.replace(" ", "") in _ALIASES:
        return _ALIASES[key.replace(" ", "")]
    return name.strip()


@dataclass(frozen=True)
class LabelledFile:
    path: Path  # absolute
    relpath: str  # relative to the dataset root, POSIX separators
    label: str


@dataclass
class Discovery:
    root: Path
    layout: str
    files: list[LabelledFile]
    excluded_classes: dict[str, int]  # class folders present but not requested -> file count


def _class_files(class_dir: Path) -> tuple[str, list[Path]]:
    images = class_dir / "images"
    if images.is_dir():
        base, layout = images, "release-2+ (<class>/images/)"
    else:
        base, layout = class_dir, "class folders"
    files = [
        p for p in sorted(base.rglob("*"))
        if not p.is_dir()  # special files (FIFOs...) too: the scan skips them with a reason
        and not any(part.lower() in _IGNORED_DIRS or part.startswith(".") for part in p.relative_to(base).parts)
    ]
    return layout, files


def discover(root: str | Path, classes: tuple[str, ...] | list[str] | None = None,
             allow_missing: bool = False) -> Discovery:
    """List every file under each requested class folder (none silently dropped: decoding decides).
    `allow_missing`: some classes may lack a folder (an all-COVID external set), not all of them."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataNotFound(f"dataset folder not found: {root}")
    wanted = tuple(normalise_class(c) for c in (classes or CLASS_NAMES))

    base = root
    for _ in range(3):  # descend through wrapper folders such as COVID-19_Radiography_Dataset/
        subdirs = [d for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")]
        if any(normalise_class(d.name) in wanted for d in subdirs) or len(subdirs) != 1:
            break
        base = subdirs[0]

    files: list[LabelledFile] = []
    layouts: set[str] = set()
    excluded: dict[str, int] = {}
    found: set[str] = set()
    for d in sorted(base.iterdir()):
        if not d.is_dir() or d.name.startswith("."):
            continue
        label = normalise_class(d.name)
        layout, paths = _class_files(d)
        if label not in wanted:
            excluded[label] = len(paths)
            continue
        found.add(label)
        if layout.startswith("class") and any(re.search(r" \(\d+\)\.\w+$", p.name) for p in paths):
            layout = "release-1 (<CLASS>/<CLASS> (n).png)"
        layouts.add(layout)
        files += [LabelledFile(p, p.relative_to(root).as_posix(), label) for p in paths]
    missing = [c for c in wanted if c not in found]
    if missing and (not allow_missing or not found):
        raise DataNotFound(
            f"no folder for class(es) {missing} under {base}; found folders: "
            f"{sorted(d.name for d in base.iterdir() if d.is_dir())}"
        )
    return Discovery(root, " + ".join(sorted(layouts)), files, excluded)
