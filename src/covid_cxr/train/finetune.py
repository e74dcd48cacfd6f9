"""Staged fine-tuning that a 2-core CPU can afford (`--finetune` on EfficientNet-Lite).

Stage 1 is the usual head on cached pooled features. Stage 2 unfreezes the backbone's last stages
(`ArchSpec.finetune_modules`: for Lite, blocks.6 + conv_head + bn2) at a lower rate with a cosine
schedule. Everything below those stages stays frozen (BatchNorm statistics included), so its output
for a given input never changes: it is computed once, by ONNX Runtime, for the plain image and for
`finetune_views - 1` augmented copies of every training image (small rotation, scale and shift,
brightness/contrast/gamma; no horizontal flip: the heart is on the left), and cached like the
pooled features. The same pass over the plain image also takes the out-of-distribution gate's
statistics of the stages it crosses (all the gate's stages lie in the trunk; trust/stages.py), cached
likewise, so the trust step needs no second pass through the whole backbone. Each epoch then trains
the last stages on one cached view per image, drawn at random. An epoch costs the last stages'
forward and backward at 7x7 instead of the whole network at 224x224 (measured:
benchmarks/bench_finetune.py). The price: augmentation is limited to the cached views, and only the
unfrozen stages adapt.

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

from covid_cxr.core.architectures import get_spec
from covid_cxr.train.module import ClassifierModule
from covid_cxr.trust.stages import SPLITS, channel_stats, stage_indices

TRUNK_OUTPUT = "activations"
STATS_OUTPUT = "stage_stats"  # the OOD gate's statistics of the stages inside the trunk


def staged_supported(arch: str) -> bool:
    """The trunk/top split below knows timm's EfficientNet layout (conv_stem, bn1, blocks, conv_head, bn2)."""
    return get_spec(arch).finetune_modules[:1] == ("blocks.6",)


def first_trainable_block(arch: str, from_block: int | None = None) -> int:
    """The first block stage 2 trains: `from_block` (TrainConfig.finetune_from_block) or the architecture's."""
    return from_block if from_block is not None else int(get_spec(arch).finetune_modules[0].split(".")[1])


def trainable_modules(cfg) -> tuple[str, ...]:
    """What stage 2 unfreezes: the architecture's finetune_modules, from cfg.finetune_from_block when set."""
    modules = get_spec(cfg.arch).finetune_modules
    if cfg.finetune_from_block is None or not staged_supported(cfg.arch):
        return modules
    last = first_trainable_block(cfg.arch)
    return (*(f"blocks.{i}" for i in range(cfg.finetune_from_block, last)), *modules)


def gate_takes(backbone: nn.Module, k: int) -> tuple[int, ...]:
    """Where the OOD gate's stages (trust.stages.stage_indices) end, as timm's block positions
    (stage_ends; 0 = the stem), or () when one lies past a trunk of k blocks. For Lite all lie in
    the frozen trunk, so their statistics never change and come from the trunk's own pass."""
    takes = tuple(backbone.stage_ends[i] for i in stage_indices(backbone))
    return takes if takes and max(takes) <= k else ()


class Trunk(nn.Module):
    """The frozen part: stem and blocks[:k] (input already normalised). With `takes` (gate_takes), it
    also returns the gate's statistics of those stages, in StageStats' order and by its formula
    (channel_stats): the trust step then needs no second pass through the fine-tuned backbone."""

    def __init__(self, backbone: nn.Module, k: int, takes: tuple[int, ...] = ()):
        super().__init__()
        self.stem = nn.Sequential(backbone.conv_stem, backbone.bn1)
        self.blocks = nn.Sequential(*backbone.blocks[:k])
        self.takes = tuple(takes)

    def forward(self, x: torch.Tensor):
        if not self.takes:
            return self.blocks(self.stem(x))
        x = self.stem(x)
        stats = channel_stats(x) if 0 in self.takes else []
        for position, block in enumerate(self.blocks, 1):  # as timm's forward_intermediates counts
            x = block(x)
            if position in self.takes:
                stats += channel_stats(x)
        return x, torch.cat(stats, dim=1)


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
    """(cached trunk activations of one view, label[, the teacher's probabilities on that view]);
    training draws a view per image per epoch."""

    def __init__(self, views: list[torch.Tensor], labels: torch.Tensor, seed: int, random_view: bool,
                 soft: list[torch.Tensor] | None = None):
        self.views, self.labels, self.random_view, self.soft = views, labels, random_view, soft
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        v = int(self.rng.integers(len(self.views))) if self.random_view else 0
        item = (self.views[v][i].float(), self.labels[i])
        return item if self.soft is None else (*item, self.soft[v][i])


class ViewDataModule(L.LightningDataModule):
    """`soft`: the teacher's probabilities per training view (distillation, train/distil.py)."""

    def __init__(self, acts: dict, batch_size: int, seed: int, soft: list[torch.Tensor] | None = None):
        super().__init__()
        self.acts, self.batch_size, self.seed, self.soft = acts, batch_size, seed, soft

    def _loader(self, split: str, train: bool) -> DataLoader:
        views, labels = self.acts[split]
        ds = ViewDataset(views, labels, self.seed, random_view=train, soft=self.soft if train else None)
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


def stats_suffix(takes: tuple[int, ...]) -> str:
    """Names the trunk graph and the statistics cache by the stages they summarise (none: today's names)."""
    return f"-stats{''.join(map(str, takes))}" if takes else ""


def trunk_extractor(model, k: int, size: int, cache_dir: Path, takes: tuple[int, ...] = ()):
    """ONNX Runtime session of the frozen trunk, exported once per arch, size, weights, depth and
    `takes`. run(x, n) -> the graph's first n outputs (activations[, stage statistics])."""
    from covid_cxr.bundle.reader import open_session
    from covid_cxr.features.onnx import weights_digest
    from covid_cxr.features.onnx import export_trunk

    name = f"{model.spec.name}-{size}-{weights_digest(model.backbone)}-trunk{k}{stats_suffix(takes)}.onnx"
    path = Path(cache_dir) / "backbones" / name
    if not path.is_file():
        export_trunk(Trunk(model.backbone, k, takes), path, size, (TRUNK_OUTPUT, STATS_OUTPUT)[:1 + bool(takes)])
    session = open_session(path)
    names = [o.name for o in session.get_outputs()]
    mean, std = np.float32(float(model.mean)), np.float32(float(model.std))

    def run(x: np.ndarray, n: int = 1) -> list[torch.Tensor]:
        x = (np.asarray(x, dtype=np.float32)[:, None] - mean) / std
        return [torch.from_numpy(o) for o in session.run(names[:n], {"pixels": x})]

    return run



def view_seeds(items: list[tuple[Path, str]], view: int) -> list[int]:
    """One augmentation seed per image and view, from the image's sha256 (stable across runs)."""
    return [(int(sha[:12], 16) * 31 + view) % (2**31) for _, sha in items]


def augment_each(x: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    return torch.cat([augment_batch(x[i:i + 1], s) for i, s in enumerate(seeds)])


def extract_view(run, items, size: int, caches: list, view: int, progress: bool, batch: int = 32) -> None:
    """Trunk outputs of `items` for one view (0: the plain image), only what a cache lacks: one
    FeatureCache per output (the activations[, the gate's stage statistics]), saved together."""
    from covid_cxr.data.decode import load_batch
    from covid_cxr.core.progress import progress_iter

    todo = [it for it in items if any(it[1] not in c.rows for c in caches)]
    chunks = [todo[i:i + batch] for i in range(0, len(todo), batch)]
    for n, chunk in enumerate(progress_iter(chunks, f"trunk activations, view {view}",
                                            enabled=progress and bool(chunks)), 1):
        x = torch.from_numpy(load_batch([p for p, _ in chunk], size, size))[:, None]
        if view:
            x = augment_each(x, view_seeds(chunk, view))
        for cache, out in zip(caches, run(x[:, 0].numpy(), len(caches))):
            for (_, sha), a in zip(chunk, out):
                cache.rows[sha] = a.clone() if view == 0 else a.to(torch.float16)  # views: half the memory
        if n % 20 == 0 or n == len(chunks):
            for cache in caches:
                cache.save()


def trunk_views(model, prepared, cfg, cache_dir: Path) -> tuple[dict, dict | None]:
    """split -> ([view tensors N x C x h x w], labels): `finetune_views` views for train, view 0 else;
    and split -> the gate's trunk-stage statistics of view 0 (N x S; None when gate_takes is empty)."""
    from covid_cxr.data.dataset import labels_of
    from covid_cxr.features.onnx import weights_digest
    from covid_cxr.features.cache import FeatureCache, cache_key

    k = first_trainable_block(cfg.arch, cfg.finetune_from_block)
    takes = gate_takes(model.backbone, k)
    run = trunk_extractor(model, k, cfg.size, cache_dir, takes)
    key = f"{cache_key(cfg.arch, weights_digest(model.backbone), cfg.size, prepared.mean, prepared.std)}-trunk{k}"
    stats = FeatureCache(Path(cache_dir) / f"{key}-view0{stats_suffix(takes)}.safetensors") if takes else None
    items = {s: [(prepared.manifest.root / r.path, r.sha256) for r in prepared.splits[s]] for s in prepared.splits}
    out = {}
    for v in range(cfg.finetune_views):
        cache = FeatureCache(Path(cache_dir) / f"{key}-view{v}.safetensors")
        wanted = items["train"] if v else [it for s in SPLITS for it in items[s]]
        extract_view(run, wanted, cfg.size, [cache, stats] if v == 0 and stats else [cache], v, cfg.progress)
        for s in SPLITS:
            if v == 0 or s == "train":
                out.setdefault(s, []).append(torch.stack([cache.rows[sha] for _, sha in items[s]]))
    gate = {s: torch.stack([stats.rows[sha] for _, sha in items[s]]) for s in SPLITS} if stats else None
    return {s: (views, torch.from_numpy(labels_of(prepared, s))) for s, views in out.items()}, gate


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


def gate_features(model, pooled: dict, stats: dict | None):
    """The OOD gate's inputs (trust.stages.StageFeatures, StageStats' layout: the pooled block, then
    each stage's statistics) from what fine-tuning computed anyway; None without `stats` (the trust
    step then runs StageStats over the fine-tuned backbone)."""
    from covid_cxr.trust.stages import StageFeatures, stage_layout

    if stats is None:
        return None
    indices = stage_indices(model.backbone)
    splits = {s: np.concatenate([pooled[s][0].numpy(), stats[s].numpy()], axis=1) for s in SPLITS}
    return StageFeatures(indices, stage_layout(model, indices), splits)


def finetune_stage(model, prepared, cfg, run, cache_dir: Path, history, resume: bool):
    """Stage 2 (after the head on pooled features): returns (split -> pooled features, the OOD gate's
    StageFeatures or None, history)."""
    from covid_cxr.train.fit import Inputs, RunDir, fit

    acts, stats = trunk_views(model, prepared, cfg, cache_dir)
    materialise(model)
    model.freeze_backbone(trainable=trainable_modules(cfg))
    top = Top(model, first_trainable_block(cfg.arch, cfg.finetune_from_block))
    args = (top, cfg.lr, prepared.class_weights, cfg.finetune_lr_factor, cfg.finetune_epochs)
    soft = None
    if cfg.distil_from:  # a student: the teacher's soft labels on the same views (train/distil.py)
        from covid_cxr.train.distil import DistilModule, teacher_targets

        soft = teacher_targets(cfg, prepared, cache_dir)
        module = DistilModule(*args, cfg.distil_temperature, cfg.distil_weight)
    else:
        module = FinetuneModule(*args)
    stage_cfg = cfg.model_copy(update={"epochs": cfg.finetune_epochs})
    data = ViewDataModule(acts, cfg.batch_size, cfg.seed, soft)
    stage2 = fit(Inputs(top, data, None), prepared, stage_cfg, RunDir(run.root / "finetune"), resume, module=module)
    last = history.epochs[-1]["epoch"] if history.epochs else 0
    history.epochs += [{**row, "epoch": last + row["epoch"], "stage": 2} for row in stage2.epochs]
    pooled = pooled_features(top, acts)
    return pooled, gate_features(model, pooled, stats), history
