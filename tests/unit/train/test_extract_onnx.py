"""Frozen features through ONNX Runtime agree with PyTorch's, and the exported backbone is cached
under a key that changes with the weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from covid_cxr.data.decode import load_batch
from covid_cxr.models import create_model
from covid_cxr.features.onnx import OnnxFeatureExtractor, backbone_path, weights_digest
from covid_cxr.features.cache import FeatureCache, extract

SIZE = 64


def _images(tiny_data, n=6):
    return sorted(tiny_data.rglob("*.png"))[:n]


@pytest.fixture(scope="module")
def model():
    """One random-weight backbone for the module (each ONNX export costs ~10 s of CPU)."""
    torch.manual_seed(0)
    return create_model("efficientnet_lite0", "none", mean=0.45, std=0.22)[0]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("feature-cache")


@pytest.mark.slow  # in `make test`, not in `make test-fast`
def test_onnx_features_agree_with_torch_and_the_backbone_is_cached(tiny_data, model, cache_dir):
    tmp_path = cache_dir
    paths = _images(tiny_data)
    x = torch.from_numpy(load_batch(paths, SIZE, SIZE))[:, None]
    with torch.inference_mode():
        want = model.eval().features(x)
    ort = OnnxFeatureExtractor(model, SIZE, tmp_path)
    got = ort(x.numpy())
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel < 1e-4, rel
    assert ort.path == backbone_path(tmp_path, "efficientnet_lite0", SIZE, weights_digest(model.backbone))
    stamp = ort.path.stat().st_mtime_ns
    OnnxFeatureExtractor(model, SIZE, tmp_path)  # same weights and size: the graph is reused
    assert ort.path.stat().st_mtime_ns == stamp
    other, _ = create_model("efficientnet_lite0", "none")  # other random weights: another graph
    assert weights_digest(other.backbone) != weights_digest(model.backbone)


@pytest.mark.slow  # the trunk exported and run through ONNX Runtime and torch
def test_extract_through_onnxruntime_fills_the_cache_like_torch(tiny_data, model, cache_dir, tmp_path):
    import hashlib

    paths = _images(tiny_data, 5)
    items = [(p, hashlib.sha256(p.read_bytes()).hexdigest()) for p in paths]
    cache = FeatureCache(cache_dir / "c.safetensors")
    got = extract(model, items, SIZE, cache, batch_size=2, progress=False, engine="onnxruntime")
    want = extract(model, items, SIZE, None, batch_size=2, progress=False, engine="torch")
    assert got.shape == want.shape == (5, model.num_features)
    assert np.allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert len(list((cache_dir / "backbones").glob("efficientnet_lite0-64-*.onnx"))) == 1  # exported once
    assert len(FeatureCache(cache_dir / "c.safetensors").rows) == 5
