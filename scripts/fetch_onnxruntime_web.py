"""Fetch onnxruntime-web (the web page's in-browser mode) from npm into serve/static/vendor/.

The page must work offline (a clinic without internet), so our own server serves the runtime; the
files are ~15 MB, so they are fetched at install time instead of committed. Repeatable: one pinned
version, checked against its npm sha512 before anything is unpacked; only the three files the WASM
build needs (and package.json, for its version and MIT licence) are kept.

    python scripts/fetch_onnxruntime_web.py      (or: make web-runtime)
"""

from __future__ import annotations

import base64
import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "onnxruntime-web"
VERSION = "1.31.1"
INTEGRITY = "sha512-5GeH+bWQ+HxM10z7erGlsWqryrwMbSvm/1tkIsKTT48g0fI19VXVVC435t4t7VsPdSQeS7NmuZPXrQ73k82URw=="
FILES = ("dist/ort.wasm.min.js", "dist/ort-wasm-simd-threaded.mjs", "dist/ort-wasm-simd-threaded.wasm", "package.json")
DEST = Path(__file__).resolve().parents[1] / "src" / "covid_cxr" / "serve" / "static" / "vendor" / PACKAGE


def present(dest: Path = DEST) -> bool:
    """Whether every file is there already (then nothing is fetched)."""
    return all((dest / Path(f).name).is_file() for f in FILES) and f'"version": "{VERSION}"' in \
        (dest / "package.json").read_text(encoding="utf-8")


def npm_pack(workdir: Path) -> bytes:
    """The package tarball through npm's own client (its cache, proxy and registry settings)."""
    if shutil.which("npm") is None:
        raise SystemExit("error: npm not found: install Node.js/npm (apt-get install npm), or copy the files by hand")
    out = subprocess.run(["npm", "pack", f"{PACKAGE}@{VERSION}", "--silent", "--pack-destination", str(workdir)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"error: npm pack {PACKAGE}@{VERSION} failed: {out.stderr.strip().splitlines()[-1:]}")
    return (workdir / out.stdout.strip().splitlines()[-1]).read_bytes()


def check(tarball: bytes) -> None:
    """The tarball must be the one npm published for VERSION (its sha512 integrity)."""
    got = "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode()
    if got != INTEGRITY:
        raise SystemExit(f"error: {PACKAGE}-{VERSION}.tgz has integrity {got}, expected {INTEGRITY}")


def unpack(tarball: bytes, dest: Path) -> None:
    """The FILES only, flat, into a fresh folder renamed into place (never half a runtime)."""
    tmp = Path(tempfile.mkdtemp(prefix=".ortweb-", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the files from a server running as another user
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        for name in FILES:
            member = tar.getmember(f"package/{name}")
            (tmp / Path(name).name).write_bytes(tar.extractfile(member).read())
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def main() -> int:
    if present():
        print(f"{PACKAGE} {VERSION} already in {DEST.relative_to(Path.cwd()) if DEST.is_relative_to(Path.cwd()) else DEST}")
        return 0
    DEST.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        tarball = npm_pack(Path(work))
    check(tarball)
    unpack(tarball, DEST)
    size = sum(p.stat().st_size for p in DEST.iterdir()) / 1e6
    print(f"{PACKAGE} {VERSION}: {len(FILES)} files, {size:.1f} MB in {DEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
