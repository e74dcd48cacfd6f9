"""scripts/fetch_onnxruntime_web.py: only the pinned tarball is unpacked, and only the files the page needs."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "fetch_onnxruntime_web.py"


@pytest.fixture
def fetch():
    spec = importlib.util.spec_from_file_location("fetch_onnxruntime_web", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tarball(fetch, extra: str = "package/dist/ort.webgpu.min.js") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in [*(f"package/{f}" for f in fetch.FILES), extra]:
            data = f'{{"version": "{fetch.VERSION}"}}'.encode() if name.endswith("package.json") else name.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_the_pinned_tarball_is_unpacked_flat_and_nothing_else(fetch, tmp_path, monkeypatch):
    tarball = _tarball(fetch)
    monkeypatch.setattr(fetch, "INTEGRITY", "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode())
    fetch.check(tarball)
    dest = tmp_path / "vendor" / "onnxruntime-web"
    dest.parent.mkdir()
    fetch.unpack(tarball, dest)
    assert sorted(p.name for p in dest.iterdir()) == sorted(Path(f).name for f in fetch.FILES)
    assert (dest / "ort.wasm.min.js").read_bytes() == b"package/dist/ort.wasm.min.js"
    assert fetch.present(dest) and not fetch.present(tmp_path / "nowhere")


def test_a_tarball_with_another_hash_is_refused(fetch):
    with pytest.raises(SystemExit, match="integrity"):
        fetch.check(_tarball(fetch))  # not the published 1.31.1 tarball: its sha512 differs
