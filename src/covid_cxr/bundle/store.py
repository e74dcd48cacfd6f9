"""Where bundles live on disk: MODELS/<name>/<version>/, names and versions, atomic publishing."""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from pathlib import Path

# As JSON Schema patterns too (the server's OpenAPI document), so clients and fuzzers know the rules.
NAME_PATTERN = r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"  # no '..' anywhere
VERSION_PATTERN = r"^[1-9][0-9]{0,8}$"  # ASCII digits only: '²' or '①' pass str.isdigit()
_NAME_RE = re.compile(NAME_PATTERN.replace("$", r"\Z"))
_VERSION_RE = re.compile(VERSION_PATTERN.replace("$", r"\Z"))
TMP_PREFIX = ".tmp-"
STALE_AFTER_S = 3600.0  # a staging folder unchanged this long was left by a killed writer
FILES = ("metadata.json", "model.onnx", "model.safetensors")
RECIPE_MEMBERS = Path(".work") / "recipe-members"  # a recipe's members, under MODELS (its ensemble: MODELS/<name>)


def valid_name(name: str) -> bool:
    """Model names are plain identifiers: no separators, no '..' (they become folder names)."""
    return bool(_NAME_RE.match(name))


def parse_version(text: str) -> int | None:
    """'12' -> 12; anything that is not a positive integer of ASCII digits -> None."""
    return int(text) if _VERSION_RE.match(text) else None


def versions(model_dir: Path) -> list[int]:
    """Complete versions of one model: folders named by a positive integer holding metadata.json.
    A version folder that cannot be inspected (permissions) is left out, not fatal; an unreadable
    model folder raises OSError (the caller decides: the server logs it and serves the others)."""
    if not Path(model_dir).is_dir():
        return []
    found = []
    for p in Path(model_dir).iterdir():
        v = parse_version(p.name)
        try:
            if v is not None and p.is_dir() and (p / "metadata.json").is_file():
                found.append(v)
        except OSError:
            continue
    return sorted(found)


def member_dir(models: Path, name: str, version: int | None = None) -> Path | None:
    """An ensemble member's folder (MODELS/<name>, or MODELS/.work/recipe-members/<name> where a
    recipe trained it), or its version folder when `version` is given; None when neither holds it."""
    for root in (Path(models), Path(models) / RECIPE_MEMBERS):
        folder = root / name
        if (folder / str(version) / "metadata.json").is_file() if version else versions(folder):
            return folder / str(version) if version else folder
    return None


def _last_touched(folder: Path) -> float:
    return max([folder.stat().st_mtime] + [c.lstat().st_mtime for c in folder.iterdir()])


def clean_stale(model_dir: Path, max_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove staging folders left by killed writers: `.tmp-*` folders in which nothing has changed
    for `max_age_s`. A live writer creates its files one after another within seconds, so an
    hour without a change means nobody is writing there. Symlinks are never followed."""
    removed = []
    now = time.time()
    try:
        candidates = [p for p in Path(model_dir).iterdir() if p.name.startswith(TMP_PREFIX)]
    except OSError:
        return removed
    for p in candidates:
        try:
            if p.is_dir() and not p.is_symlink() and now - _last_touched(p) > max_age_s:
                shutil.rmtree(p)
                removed.append(p)
        except OSError:
            continue  # gone meanwhile, or not ours to remove
    return removed


def new_staging_dir(model_dir: Path) -> Path:
    """A hidden folder beside the versions, where a bundle is assembled before it is published
    (stale ones left by killed writers are removed first)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    clean_stale(model_dir)
    tmp = Path(tempfile.mkdtemp(dir=model_dir, prefix=TMP_PREFIX))
    tmp.chmod(0o755)
    return tmp


def publish(staging: Path, model_dir: Path, write_metadata) -> int:
    """Rename `staging` to the next free version number; `write_metadata(version)` writes its
    metadata.json first (the number is in it). Another writer may take a number first: retry."""
    version = (versions(model_dir) or [0])[-1] + 1
    while True:
        write_metadata(staging, version)
        final = model_dir / str(version)
        try:
            staging.rename(final)
            return version
        except OSError:
            if not final.exists():
                raise
            version += 1


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
