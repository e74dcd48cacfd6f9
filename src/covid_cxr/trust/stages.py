"""What the out-of-distribution gate looks at: the pooled features the head sees, and the channel means
and standard deviations of the backbone's intermediate stages (Lee et al. 2018's feature ensemble).

Why the intermediate stages: the pooled features are made to separate the three classes and keep
little of the low-level intensity and texture statistics, so an inverted X-ray, a single corner or a
smooth gradient lands close to the training images there (issue 8 measured 63 %, 81 % and 96 %
rejected). The early stages keep those statistics. One module (`StageStats`) computes them inside the
exported model.onnx and for fitting (exported to ONNX Runtime once, cached per image like the pooled
features), so the gate's inputs at fitting time and in the bundle cannot differ. Staged fine-tuning
(train/finetune.py) takes the statistics of its frozen trunk's stages in the trunk's own pass, by the
same `channel_stats`, and so spares the trust step this second pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

POOLED = "pooled"  # the layout's first block: the features the head sees
SPLITS = ("train", "val", "test")


def stage_indices(backbone: nn.Module) -> tuple[int, ...]:
    """Every timm feature_info stage but the deepest: that one is the final features (or their
    input), already covered by the pooled block. Chosen on a dev set (docs/results/trust.md)."""
    return tuple(range(len(backbone.feature_info) - 1))


def stage_layout(classifier, indices) -> list[tuple[str, int, int]]:
    """(name, start, stop) of each block in StageStats' output: pooled, then each stage's mean|std."""
    out, at = [(POOLED, 0, classifier.num_features)], classifier.num_features
    for i in indices:
        info = classifier.backbone.feature_info[i]
        out.append((info["module"], at, at + 2 * info["num_chs"]))
        at += 2 * info["num_chs"]
    return out


class StageStats(nn.Module):
    """N x 1 x H x W pixels in [0, 1] -> N x D: pooled features, then per stage channel means and
    standard deviations over the image (one backbone pass; the pooled block equals
    `Classifier.features`, so the head's input is unchanged)."""

    def __init__(self, classifier, indices=()):
        super().__init__()
        self.classifier = classifier
        self.indices = [int(i) for i in indices]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.classifier
        x = (x - c.mean) / c.std
        if not self.indices:  # bundles whose gate reads the pooled features only
            return c.backbone.forward_features(x).mean(dim=(2, 3))
        final, inter = c.backbone.forward_intermediates(x, indices=self.indices)
        return torch.cat([final.mean(dim=(2, 3)), *[p for t in inter for p in channel_stats(t)]], dim=1)


def channel_stats(t: torch.Tensor) -> list[torch.Tensor]:
    """One stage's block of the gate: N x C x H x W -> [channel means, channel standard deviations]
    (N x C each, over the image). Shared by StageStats and the fine-tuning trunk (train/finetune.py),
    which computes the stages below the fine-tuned ones in its own pass: the same numbers either way."""
    m = t.mean(dim=(2, 3), keepdim=True)
    return [m.flatten(1), (t - m).pow(2).mean(dim=(2, 3)).sqrt()]


@dataclass
class StageFeatures:
    indices: tuple[int, ...]
    layout: list[tuple[str, int, int]]
    splits: dict[str, np.ndarray]  # split -> N x D (StageStats' output)


def stage_features(model, prepared, cfg, cache_dir: Path, threads: int = 0) -> StageFeatures:
    """StageStats of every split's images, computed once per image and backbone (cached by the
    image's sha256 under a key holding everything the vector depends on)."""
    from covid_cxr.lungs.crop import batch_transform
    from covid_cxr.features.onnx import weights_digest
    from covid_cxr.features.cache import ORT_FROM_IMAGES, FeatureCache, cache_key, extract

    indices = stage_indices(model.backbone)
    key = cache_key(cfg.arch, weights_digest(model.backbone), cfg.size, prepared.mean, prepared.std,
                    cfg.lung_crop, cfg.lungs) + "-stages" + "".join(map(str, indices))
    cache = FeatureCache(Path(cache_dir) / f"{key}.safetensors")
    items = {s: [(prepared.manifest.root / r.path, r.sha256) for r in prepared.splits[s]] for s in SPLITS}
    todo = list(dict.fromkeys(it for s in SPLITS for it in items[s] if it[1] not in cache.rows))
    if todo:  # the engine as for the pooled features: ONNX Runtime from ORT_FROM_IMAGES images
        ort = cfg.extractor == "onnxruntime" or (cfg.extractor == "auto" and len(todo) >= ORT_FROM_IMAGES)
        graph = Path(cache_dir) / "backbones" / f"{key}.onnx" if ort else None
        run = stage_runner(model, indices, cfg.size, graph, threads)
        extract(model, todo, cfg.size, cache, progress=cfg.progress, transform=batch_transform(cfg.lung_crop, cfg.lungs),
                featurize=lambda x: torch.from_numpy(run(np.ascontiguousarray(x.numpy(), np.float32))),
                label="OOD gate: stage statistics")
    splits = {s: np.stack([cache.rows[sha].numpy() for _, sha in items[s]]) if items[s] else
              np.zeros((0, stage_layout(model, indices)[-1][2]), np.float32) for s in SPLITS}
    return StageFeatures(indices, stage_layout(model, indices), splits)


def stage_runner(model, indices, size: int, onnx_path: Path | None = None, threads: int = 0):
    """x (N x 1 x H x W float32, numpy) -> StageStats (N x D, numpy): by ONNX Runtime from the graph
    at `onnx_path` (exported there once; 3-6x faster than torch on a CPU), or by torch without one."""
    net = StageStats(model.eval(), indices).eval()
    if onnx_path is not None:
        from covid_cxr.bundle.reader import open_session
        from covid_cxr.features.onnx import FEATURES_INPUT
        from covid_cxr.features.onnx import export_trunk

        if not Path(onnx_path).is_file():
            export_trunk(net, Path(onnx_path), size)
        session = open_session(onnx_path, threads)
        return lambda x: session.run(None, {FEATURES_INPUT: x})[0]

    def torch_run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return net(torch.from_numpy(x)).numpy()

    return torch_run

