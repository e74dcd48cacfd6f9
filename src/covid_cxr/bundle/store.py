"""Where bundles live on disk: MODELS/<name>/<version>/, names and versions, atomic publishing."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_VERSION_RE = re.compile(r"^[1-9][0-9]{0,8}$")  # ASCII digits only: '²' or '①' pass str.isdigit()
TMP_PREFIX = ".tmp-"
FILES = ("metadata.json", "model.onnx", "model.safetensors")


def valid_name(name: str) -> bool:
    """Model names are plain identifiers: no separators, no '..' (they become folder names)."""
    return bool(_NAME_RE.match(name)) and ".." not in name


def parse_version(text: str) -> int | None:
    """'12' -> 12; anything that is not a positive integer of ASCII digits -> None."""
    return int(text) if _VERSION_RE.match(text) else None


def versions(model_dir: Path) -> list[int]:
    """Complete versions of one model: folders named by a positive integer holding metadata.json."""
    if not Path(model_dir).is_dir():
        return []
    found = []
    for p in Path(model_dir).iterdir():
        v = parse_version(p.name)
        if v is not None and p.is_dir() and (p / "metadata.json").is_file():
            found.append(v)
    return sorted(found)


def new_staging_dir(model_dir: Path) -> Path:
    """A hidden folder beside the versions, where a bundle is assembled before it is published."""
    model_dir.mkdir(parents=True, exist_ok=True)
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
