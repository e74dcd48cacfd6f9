"""Frozen-feature extraction through ONNX Runtime: the same backbone, 3-6x faster than PyTorch on
this CPU (benchmarks/bench_pipeline.py prints both), with features equal to ~1e-5.

The backbone (pooled features, no normalisation) is exported once per architecture, input size and
weights, and kept beside the feature cache as ``backbones/<arch>-<size>-<weights sha>.onnx``. The
key hashes the backbone's *tensors*, not the weight source's name, so random initialisations
(``--weights none``) or a changed file never reuse a stale graph. Normalisation (the train split's
mean/std, which differs per dataset and seed) is applied in numpy before the graph, exactly as
`Classifier.features` applies it, so one exported backbone serves every split and seed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from covid_cxr.models.onnx import export_graph

FEATURES_INPUT = "pixels"  # N x 1 x H x W, already normalised
FEATURES_OUTPUT = "features"  # N x F (global-average pooled)


class PooledBackbone(nn.Module):
    """The part of `Classifier.features` after normalisation: backbone + global average pool."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x).mean(dim=(2, 3))


def weights_digest(module: nn.Module) -> str:
    """sha256 over the module's parameter and buffer tensors (names and values), 16 hex digits."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def backbone_path(cache_dir: Path, arch: str, size: int, digest: str) -> Path:
    return Path(cache_dir) / "backbones" / f"{arch}-{size}-{digest}.onnx"


def export_backbone(backbone: nn.Module, path: Path, size: int) -> Path:
    """Export the pooled backbone, N x 1 x size x size -> N x F, to `path`."""
    return export_trunk(PooledBackbone(backbone), path, size)


def export_trunk(net: nn.Module, path: Path, size: int, outputs: tuple[str, ...] = (FEATURES_OUTPUT,)) -> Path:
    """Export `net` (N x 1 x size x size -> one tensor per name in `outputs`) to `path`, atomically
    (temp file renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{np.random.default_rng().integers(1 << 30)}.tmp")
    net = net.eval()
    try:
        export_graph(net, torch.rand(2, 1, size, size), tmp, [FEATURES_INPUT], list(outputs))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class OnnxFeatureExtractor:
    """`Classifier.features` for a frozen backbone, run by ONNX Runtime (fp32, same numbers)."""

    def __init__(self, model, size: int, cache_dir: Path, threads: int = 0):
        from covid_cxr.bundle.reader import open_session

        self.mean, self.std = float(model.mean), float(model.std)
        self.path = backbone_path(cache_dir, model.spec.name, size, weights_digest(model.backbone))
        if not self.path.is_file():
            export_backbone(model.backbone, self.path, size)
        self.session = open_session(self.path, threads)

    def __call__(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """N x 1 x H x W (or N x H x W) pixels in [0, 1] -> N x F features (float32 tensor)."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 3:
            x = x[:, None]
        x = (x - np.float32(self.mean)) / np.float32(self.std)  # what Classifier.features does first
        return torch.from_numpy(self.session.run([FEATURES_OUTPUT], {FEATURES_INPUT: x})[0])
