"""Small shared helpers: atomic file writes, file hashes, a stopwatch (progress: core.progress)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are meant to be read by others (servers)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks (a model file need not fit in memory twice)."""
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


class Stopwatch:
    """Seconds per named step, and the total since creation."""

    def __init__(self):
        self._start = self._last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._last
        self._last = now
        return self.laps[name]

    def summary(self) -> dict[str, float]:
        return {**self.laps, "total": time.perf_counter() - self._start}


def atomic_write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A CSV file (csv module: values may hold commas, quotes or newlines), written atomically."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def missing_folders(path: str | Path) -> list[Path]:
    """The folders that `mkdir -p path` would create, outermost first."""
    path, missing = Path(path), []
    while not path.exists():
        missing.append(path)
        path = path.parent
    return missing[::-1]


def make_dirs(path: str | Path) -> list[Path]:
    """mkdir -p, returning the folders it created (outermost first), so a failure can take back
    exactly those and no folder that was there before."""
    made = missing_folders(path)
    for p in made:
        p.mkdir(exist_ok=True)
    return made


def remove_if_empty(folders: Iterable[Path]) -> None:
    """Remove each folder that is empty, innermost first (those a failed run created and left empty)."""
    for p in sorted(folders, key=lambda q: len(q.parts), reverse=True):
        try:
            p.rmdir()
        except OSError:  # not empty, or already gone
            pass


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Build a folder's files under a hidden temporary sibling and move them into place at the end: a
    failure or an interrupt leaves what was there before (or nothing, not even a folder it created),
    never half a new report. A new folder is renamed into place whole; into one that exists (a
    user's --out may hold other files) each file is renamed in, replacing its namesake only."""
    path = Path(path)
    made = make_dirs(path.parent)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; reports are meant to be read by others
        if not path.exists():
            os.replace(tmp, path)
            return
        for entry in tmp.iterdir():
            target = path / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
        tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_if_empty(made)
        raise
