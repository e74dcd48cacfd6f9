"""Training's own files: the feature cache keeps its keys inside the file and a mismatch rebuilds it,
rows that do not match their images are caught, and truncated caches or checkpoints are one-line
user errors."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


class MeanFeatures:
    """A stand-in backbone: the image's row means are its features."""

    def eval(self):
        return self

    def to(self, **kw):
        return self

    def features(self, x):
        return x.mean(dim=(1, 3))


def feature_items(tmp_path: Path, n: int = 4) -> list[tuple[Path, str]]:
    items = []
    for i in range(n):
        p = tmp_path / f"{i}.png"
        p.write_bytes(png(np.full((16, 16), 40 * i, np.uint8)))
        items.append((p, f"sha{i}"))
    return items


def test_feature_cache_keys_live_in_the_file_and_a_mismatch_rebuilds(tmp_path):
    import torch
    from safetensors.torch import save_file

    from covid_cxr.features.cache import FeatureCache, extract

    items = feature_items(tmp_path)
    cache = FeatureCache(tmp_path / "c.safetensors")
    feats = extract(MeanFeatures(), items, 16, cache, progress=False)
    again = FeatureCache(tmp_path / "c.safetensors")
    assert set(again.rows) == {s for _, s in items}
    torch.testing.assert_close(torch.stack([again.rows[s] for _, s in items]), feats)
    # the old layout (a separate key list that can go out of step with the rows) is not trusted
    save_file({"features": feats[:3]}, str(tmp_path / "old.safetensors"))
    (tmp_path / "old.keys.json").write_text(json.dumps([s for _, s in items]))
    assert FeatureCache(tmp_path / "old.safetensors").rows == {}
    save_file({"features": feats[:3]}, str(tmp_path / "short.safetensors"),
              metadata={"keys": json.dumps([s for _, s in items])})
    assert FeatureCache(tmp_path / "short.safetensors").rows == {}


def test_feature_cache_rows_that_do_not_match_their_images_are_caught(tmp_path):
    import torch

    from covid_cxr.features.cache import FeatureCache, extract, spot_check

    items = feature_items(tmp_path)
    cache = FeatureCache(tmp_path / "c.safetensors")
    extract(MeanFeatures(), items, 16, cache, progress=False)
    reread = FeatureCache(tmp_path / "c.safetensors")
    assert spot_check(MeanFeatures(), reread, items, 16, "fp32")
    keys = list(reread.rows)
    reread.rows = dict(zip(keys, torch.stack([reread.rows[k] for k in reversed(keys)])))
    assert not spot_check(MeanFeatures(), reread, items, 16, "fp32")


def test_truncated_cache_and_checkpoint_are_user_errors(tmp_path):
    import torch

    from covid_cxr.core.errors import UserError
    from covid_cxr.features.cache import FeatureCache, extract
    from covid_cxr.train.fit import check_checkpoint

    extract(MeanFeatures(), feature_items(tmp_path), 16, FeatureCache(tmp_path / "c.safetensors"), progress=False)
    data = (tmp_path / "c.safetensors").read_bytes()
    (tmp_path / "c.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="delete it"):
        FeatureCache(tmp_path / "c.safetensors")
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, ckpt)
    check_checkpoint(ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:2000])
    with pytest.raises(UserError, match="--resume"):
        check_checkpoint(ckpt)
    assert zipfile.is_zipfile(ckpt) is False
