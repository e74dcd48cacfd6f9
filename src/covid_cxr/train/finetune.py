"""Staged fine-tuning that a 2-core CPU can afford (`--finetune` on EfficientNet-Lite).

Stage 1 is the usual head on cached pooled features. Stage 2 unfreezes the backbone's last stages
(`ArchSpec.finetune_modules`: for Lite, blocks.6 + conv_head + bn2) at a lower rate with a cosine
schedule. Everything below those stages stays frozen (BatchNorm statistics included), so its output
for a given input never changes: it is computed once, by ONNX Runtime, for the plain image and for
`finetune_views - 1` augmented copies of every training image (small rotation, scale and shift,
brightness/contrast/gamma; no horizontal flip: the heart is on the left), and cached like the
pooled features. Each epoch then trains the last stages on one cached view per image, drawn at
random. An epoch costs the last stages' forward and backward at 7x7 instead of the whole network
at 224x224 (measured: benchmarks/bench_finetune.py). The price: augmentation is limited to the
cached views, and only the unfrozen stages adapt.

Stage 2 trains through Lightning like stage 1 (checkpoints in <run>/finetune, `--resume` works),
and the fine-tuned modules are the Classifier's own, so the bundle exports them as usual.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from covid_cxr.models.registry import get_spec
from covid_cxr.train.module import ClassifierModule

TRUNK_OUTPUT = "activations"


def staged_supported(arch: str) -> bool:
    """The trunk/top split below knows timm's EfficientNet layout (conv_stem, bn1, blocks, conv_head, bn2)."""
    return get_spec(arch).finetune_modules[:1] == ("blocks.6",)


def first_trainable_block(arch: str) -> int:
    return int(get_spec(arch).finetune_modules[0].split(".")[1])


class Trunk(nn.Module):
    """The frozen part: stem and blocks[:k] (input already normalised)."""

    def __init__(self, backbone: nn.Module, k: int):
        super().__init__()
        self.stem = nn.Sequential(backbone.conv_stem, backbone.bn1)
        self.blocks = nn.Sequential(*backbone.blocks[:k])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


class Top(nn.Module):
    """The fine-tuned part + the head: blocks[k:], conv_head, bn2, global average pool, head.
    Holds the Classifier's own modules, so training it trains the Classifier."""

    def __init__(self, model, k: int):
        super().__init__()
        b = model.backbone
        self.stages = nn.Sequential(*b.blocks[k:], b.conv_head, b.bn2)
        self.head = model.head

    def pooled(self, a: torch.Tensor) -> torch.Tensor:
        return self.stages(a).mean(dim=(2, 3))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(a))

    def train(self, mode: bool = True):
        super().train(mode)
        self.stages.eval()  # BatchNorm keeps ImageNet's running statistics (few images, small batches)
        return self


def augment_batch(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Radiograph-safe augmentation of N x 1 x H x W in [0, 1], reproducible from `seed`:
    rotation +-7 deg, scale 0.92-1.08, shift +-6 %, brightness/contrast +-15 %, gamma 0.8-1.25."""
    from torchvision.transforms import v2

    torch.manual_seed(seed)
    affine = v2.RandomAffine(degrees=7, translate=(0.06, 0.06), scale=(0.92, 1.08))
    jitter = v2.ColorJitter(brightness=0.15, contrast=0.15)
    out = []
    for img in x:
        img = jitter(affine(img)).clamp(0, 1)
        gamma = float(torch.empty(1).uniform_(np.log(0.8), np.log(1.25)).exp())
        out.append(img.clamp_min(1e-6) ** gamma)
    return torch.stack(out)


class ViewDataset(Dataset):
    """(cached trunk activations of one view, label); training draws a view per image per epoch."""

    def __init__(self, views: list[torch.Tensor], labels: torch.Tensor, seed: int, random_view: bool):
        self.views, self.labels, self.random_view = views, labels, random_view
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        v = int(self.rng.integers(len(self.views))) if self.random_view else 0
        return self.views[v][i].float(), self.labels[i]


class ViewDataModule(L.LightningDataModule):
    def __init__(self, acts: dict, batch_size: int, seed: int):
        super().__init__()
        self.acts, self.batch_size, self.seed = acts, batch_size, seed

    def _loader(self, split: str, train: bool) -> DataLoader:
        views, labels = self.acts[split]
        ds = ViewDataset(views, labels, self.seed, random_view=train)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=train,
                          generator=torch.Generator().manual_seed(self.seed))

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False)


class FinetuneModule(ClassifierModule):
    """AdamW, the unfrozen stages at `lr * lr_factor`, the head at `lr`, cosine decay over the epochs."""

    def __init__(self, net: Top, lr: float, class_weights, lr_factor: float, epochs: int):
        super().__init__(net, lr, class_weights)
        self.lr_factor, self.epochs = lr_factor, epochs

    def configure_optimizers(self):
        groups = [{"params": [p for p in self.net.stages.parameters() if p.requires_grad], "lr": self.lr * self.lr_factor},
                  {"params": list(self.net.head.parameters()), "lr": self.lr}]
        opt = torch.optim.AdamW(groups, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.epochs))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def trunk_extractor(model, k: int, size: int, cache_dir: Path):
    """ONNX Runtime session of the frozen trunk, exported once per arch, size, weights and depth."""
    from covid_cxr.bundle.reader import open_session
    from covid_cxr.train.extract_onnx import export_graph, weights_digest

    path = Path(cache_dir) / "backbones" / f"{model.spec.name}-{size}-{weights_digest(model.backbone)}-trunk{k}.onnx"
    if not path.is_file():
        export_graph(Trunk(model.backbone, k), path, size)
    session = open_session(path)
    mean, std = np.float32(float(model.mean)), np.float32(float(model.std))

    def run(x: np.ndarray) -> torch.Tensor:
        x = (np.asarray(x, dtype=np.float32)[:, None] - mean) / std
        return torch.from_numpy(session.run(None, {"pixels": x})[0])

    return run



def view_seeds(items: list[tuple[Path, str]], view: int) -> list[int]:
    """One augmentation seed per image and view, from the image's sha256 (stable across runs)."""
    return [(int(sha[:12], 16) * 31 + view) % (2**31) for _, sha in items]


def augment_each(x: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    return torch.cat([augment_batch(x[i:i + 1], s) for i, s in enumerate(seeds)])


def extract_view(run, items, size: int, cache, view: int, progress: bool, batch: int = 32) -> None:
    """Trunk activations of `items` for one view (0: the plain image), only what `cache` lacks."""
    from covid_cxr.data.decode import load_batch
    from covid_cxr.utils import progress_iter

    todo = [it for it in items if it[1] not in cache.rows]
    chunks = [todo[i:i + batch] for i in range(0, len(todo), batch)]
    for n, chunk in enumerate(progress_iter(chunks, f"trunk activations, view {view}",
                                            enabled=progress and bool(chunks)), 1):
        x = torch.from_numpy(load_batch([p for p, _ in chunk], size, size))[:, None]
        if view:
            x = augment_each(x, view_seeds(chunk, view))
        acts = run(x[:, 0].numpy())
        for (_, sha), a in zip(chunk, acts):
            cache.rows[sha] = a.clone() if view == 0 else a.to(torch.float16)  # views: half the memory
        if n % 20 == 0:
            cache.save()
    if chunks:
        cache.save()


def trunk_views(model, prepared, cfg, cache_dir: Path) -> dict:
    """split -> ([view tensors N x C x h x w], labels): `finetune_views` views for train, view 0 else."""
    from covid_cxr.data.dataset import labels_of
    from covid_cxr.train.extract_onnx import weights_digest
    from covid_cxr.train.features import FeatureCache, cache_key

    k = first_trainable_block(cfg.arch)
    run = trunk_extractor(model, k, cfg.size, cache_dir)
    key = f"{cache_key(cfg.arch, weights_digest(model.backbone), cfg.size, prepared.mean, prepared.std)}-trunk{k}"
    items = {s: [(prepared.manifest.root / r.path, r.sha256) for r in prepared.splits[s]] for s in prepared.splits}
    out = {}
    for v in range(cfg.finetune_views):
        cache = FeatureCache(Path(cache_dir) / f"{key}-view{v}.safetensors")
        wanted = items["train"] if v else [it for s in ("train", "val", "test") for it in items[s]]
        extract_view(run, wanted, cfg.size, cache, v, cfg.progress)
        for s in ("train", "val", "test"):
            if v == 0 or s == "train":
                out.setdefault(s, []).append(torch.stack([cache.rows[sha] for _, sha in items[s]]))
    return {s: (views, torch.from_numpy(labels_of(prepared, s))) for s, views in out.items()}


def materialise(module: nn.Module) -> None:
    """Replace inference tensors (left by extraction under torch.inference_mode, which re-creates
    parameters when it changes their memory format) by ordinary ones, so they can be trained."""
    with torch.no_grad():
        for m in module.modules():
            for k, p in list(m._parameters.items()):
                if p is not None and p.is_inference():
                    m._parameters[k] = nn.Parameter(p.clone(), requires_grad=p.requires_grad)
            for k, b in list(m._buffers.items()):
                if b is not None and b.is_inference():
                    m._buffers[k] = b.clone()


@torch.inference_mode()
def pooled_features(top: Top, acts: dict) -> dict:
    """split -> (pooled features after the fine-tuned stages, labels), from the plain view."""
    top.eval()
    return {s: (torch.cat([top.pooled(a.float()) for a in views[0].split(64)]), y) for s, (views, y) in acts.items()}


def finetune_stage(model, prepared, cfg, run, cache_dir: Path, history, resume: bool):
    """Stage 2 (after the head on pooled features): returns (split -> pooled features, history)."""
    from covid_cxr.train.fit import Inputs, RunDir, fit

    acts = trunk_views(model, prepared, cfg, cache_dir)
    materialise(model)
    model.freeze_backbone(trainable=get_spec(cfg.arch).finetune_modules)
    top = Top(model, first_trainable_block(cfg.arch))
    module = FinetuneModule(top, cfg.lr, prepared.class_weights, cfg.finetune_lr_factor, cfg.finetune_epochs)
    stage_cfg = cfg.model_copy(update={"epochs": cfg.finetune_epochs})
    data = ViewDataModule(acts, cfg.batch_size, cfg.seed)
    stage2 = fit(Inputs(top, data, None), prepared, stage_cfg, RunDir(run.root / "finetune"), resume, module=module)
    last = history.epochs[-1]["epoch"] if history.epochs else 0
    history.epochs += [{**row, "epoch": last + row["epoch"], "stage": 2} for row in stage2.epochs]
    return pooled_features(top, acts), history
