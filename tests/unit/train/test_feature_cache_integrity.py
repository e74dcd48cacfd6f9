"""The feature cache is verified in full when read (issue 17, item 11): bytes overwritten anywhere
in its rows (not only the first ones, which the spot check recomputes) make it rebuild instead of
training on NaN features; an intact cache, and an older one without a checksum but finite, are used."""

from __future__ import annotations

import io
import json

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from covid_cxr.features.cache import FeatureCache, extract


class RowMeans:
    """A stand-in backbone: 256 features per image (so the file has room to damage mid-rows)."""

    def eval(self):
        return self

    def to(self, **kw):
        return self

    def features(self, x):
        return x.mean(dim=1).flatten(1)[:, :256]


def _cache(tmp_path, n: int = 32):
    items = []
    for i in range(n):
        p = tmp_path / f"{i}.png"
        buf = io.BytesIO()
        Image.fromarray(np.full((16, 16), 7 * i, np.uint8)).save(buf, "PNG")
        p.write_bytes(buf.getvalue())
        items.append((p, f"sha{i}"))
    path = tmp_path / "c.safetensors"
    extract(RowMeans(), items, 16, FeatureCache(path), progress=False)
    return path, items


def test_bytes_overwritten_mid_file_make_the_cache_rebuild(tmp_path):
    path, items = _cache(tmp_path)
    assert set(FeatureCache(path).rows) == {s for _, s in items}  # intact: used
    data = bytearray(path.read_bytes())
    mid = len(data) * 2 // 3  # well past the rows a spot check recomputes
    data[mid:mid + 4000] = b"\xff" * 4000  # NaN float32s
    path.write_bytes(bytes(data))
    assert FeatureCache(path).rows == {}


def test_older_cache_without_checksum_is_used_when_finite_and_rebuilt_with_nan(tmp_path):
    path, items = _cache(tmp_path)
    with safe_open(str(path), "pt") as f:
        feats, keys = f.get_tensor("features"), f.metadata()["keys"]
    save_file({"features": feats}, str(path), metadata={"keys": keys})  # as written before the checksum
    assert len(FeatureCache(path).rows) == len(json.loads(keys))
    feats[20, 100] = float("nan")
    save_file({"features": feats}, str(path), metadata={"keys": keys})
    assert FeatureCache(path).rows == {}
    assert torch.isnan(feats).any()
