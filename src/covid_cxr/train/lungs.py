"""`covid-cxr lungs train`: the same Lightning loop as the classifier (seeded run folder, `best`
and `last` checkpoints, --resume, early stopping, per-epoch history), on image/mask pairs:

    pairs at cfg.image_size -> group split -> U-Net (pretrained encoder) -> fit (BCE + Dice)
        -> test Dice/IoU at the images' own size, per source -> bundle (task: segmentation)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from covid_cxr.bundle.schema import BundleContent
from covid_cxr.core.results import MaskMetrics
from covid_cxr.core.lung_config import LungConfig
from covid_cxr.data.lung_masks import LungPairs, group_split, load_pairs
from covid_cxr.models.lung_unet import MaskModel, build_unet, frozen_modules
from covid_cxr.train.distributed import Dist
from covid_cxr.train.fit import RunDir, start_run
from covid_cxr.train.module import History
from covid_cxr.core.files import Stopwatch, atomic_write_json

PARITY_IMAGES = 4


class PairDataset(Dataset):
    """(image 1 x S x S, mask 1 x S x S) tensors; with `augment`, a random affine warp applied to
    both (rotation, shift, zoom: film positioning) and brightness/contrast/gamma to the image
    (exposure). No flips: the heart sits on one side, and the zones name sides."""

    def __init__(self, pairs: LungPairs, augment: bool):
        self.images = torch.from_numpy(pairs.images)[:, None]
        self.masks = torch.from_numpy(pairs.masks.astype(np.float32))[:, None]
        self.augment = augment
        if augment:
            from torchvision.transforms import v2

            self.warp = v2.RandomAffine(degrees=10, translate=(0.06, 0.06), scale=(0.88, 1.12))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x, y = self.images[i], self.masks[i]
        if self.augment:
            from torchvision import tv_tensors

            x, y = self.warp(tv_tensors.Image(x), tv_tensors.Mask(y))
            x, y = x.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor)
            gamma = float(torch.empty(1).uniform_(0.7, 1.4))
            gain, bias = float(torch.empty(1).uniform_(0.8, 1.2)), float(torch.empty(1).uniform_(-0.1, 0.1))
            x = ((x.clamp(0, 1) ** gamma) * gain + bias).clamp(0, 1)
        return x, y


def soft_dice(probs: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Per-image soft Dice (N,)."""
    inter = (probs * target).flatten(1).sum(1)
    return (2 * inter + eps) / (probs.flatten(1).sum(1) + target.flatten(1).sum(1) + eps)


class LungModule(L.LightningModule):
    """BCE + (1 - soft Dice); logs val_dice (hard masks) for checkpoints and early stopping."""

    def __init__(self, model: MaskModel, lr: float, frozen: list[torch.nn.Module], channels_last: bool = False):
        super().__init__()
        self.model, self.lr, self._frozen = model, lr, frozen
        self._layout = torch.channels_last if channels_last else torch.contiguous_format

    def on_train_epoch_start(self):
        self._sums = [0.0, 0]  # training loss * n, n: this epoch's batches (for History)
        for m in self._frozen:  # frozen stages keep ImageNet's BatchNorm statistics
            m.eval()

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = (t.contiguous(memory_format=self._layout) for t in batch)
        logits = self.model.logits(x)
        probs = torch.sigmoid(logits)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + (1 - soft_dice(probs, y)).mean()
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        if stage == "train":
            self._sums = [self._sums[0] + loss.item() * len(y), self._sums[1] + len(y)]
        if stage == "val":
            hard = soft_dice((probs >= 0.5).float(), y, eps=1e-6).mean()
            self.log("val_dice", hard, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def epoch_train_stats(self) -> dict[str, float]:
        total, n = getattr(self, "_sums", [0.0, 0])
        return {"train_loss": total / n} if n else {}

    def configure_optimizers(self):
        opt = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.trainer.max_epochs))
        return {"optimizer": opt, "lr_scheduler": sched}


def _trainer(cfg: LungConfig, run: RunDir, history: History) -> L.Trainer:
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from covid_cxr.train.progress import EpochLog

    best = ModelCheckpoint(dirpath=run.checkpoints, filename="best", monitor="val_dice", mode="max",
                           enable_version_counter=False, save_on_train_epoch_end=True)
    last = ModelCheckpoint(dirpath=run.checkpoints, filename="last", save_top_k=1, monitor=None,
                           enable_version_counter=False, save_on_train_epoch_end=True)
    early = EarlyStopping(monitor="val_dice", mode="max", patience=cfg.patience)
    max_time = timedelta(minutes=cfg.max_minutes) if cfg.max_minutes else None
    return L.Trainer(max_epochs=cfg.epochs, max_time=max_time, accelerator="cpu", devices=1, logger=False,
                     callbacks=[best, last, early, history,
                                *([EpochLog(monitor="val_dice")] if cfg.progress else [])],
                     enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(run.root))


def source_weights(sources: list[str], balance: float) -> np.ndarray:
    """Per-pair sampling weight (pairs of its source)^-balance: 0 gives every pair one weight (the
    sources in their proportions), 1 every source the same total (cfg.source_balance)."""
    counts = Counter(sources)
    return np.array([counts[s] ** -balance for s in sources], dtype=np.float64)


def train_loader(pairs: LungPairs, cfg: LungConfig) -> DataLoader:
    """Augmented training pairs, an epoch as many draws as pairs: shuffled once each, or with
    cfg.source_balance > 0 drawn by source weight (with replacement: v7's pairs recur in an epoch
    while some quex pairs wait for the next)."""
    g = torch.Generator().manual_seed(cfg.seed)
    ds = PairDataset(pairs, True)
    if cfg.source_balance == 0 or len(set(pairs.sources)) < 2:
        return DataLoader(ds, cfg.batch_size, shuffle=True, generator=g)
    weights = torch.from_numpy(source_weights(pairs.sources, cfg.source_balance))
    return DataLoader(ds, cfg.batch_size, sampler=WeightedRandomSampler(weights, len(ds), True, generator=g))


def fit(model: MaskModel, pairs: LungPairs, split: dict[str, list[int]], cfg: LungConfig, run: RunDir,
        resume: bool) -> History:
    """Lightning fit; the best epoch's weights (by validation Dice) are put back afterwards."""
    module = LungModule(model, cfg.lr, frozen_modules(model.net.encoder.model, cfg.frozen_stages), cfg.channels_last)
    if cfg.channels_last:  # ~1.4x faster on CPU here (benchmarks/bench_lung_train.py); put back after
        model.to(memory_format=torch.channels_last)
    train_dl = train_loader(pairs.subset(split["train"]), cfg)
    val_dl = DataLoader(PairDataset(pairs.subset(split["val"]), False), cfg.batch_size)
    history = History(keys=("val_loss", "val_dice"))
    trainer = _trainer(cfg, run, history)
    last = run.checkpoints / "last.ckpt"
    trainer.fit(module, train_dl, val_dl, ckpt_path=str(last) if resume and last.is_file() else None)
    best_path = trainer.checkpoint_callback.best_model_path
    if best_path:  # our own checkpoint, written by this run; plain tensors only
        module.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"])
    model.to(memory_format=torch.contiguous_format)
    return history


def torch_probabilities(model: MaskModel):
    """N x S x S numpy -> N x S x S probabilities through the PyTorch model (for test metrics)."""
    def run(small: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model.eval()(torch.from_numpy(small)[..., None])[..., 0].numpy()
    return run


def test_metrics(model: MaskModel, root: Path, test_ids: list[str], cfg: LungConfig) -> MaskMetrics:
    """Dice/IoU on the test split at the images' own size (as `lungs evaluate` measures a bundle)."""
    from covid_cxr.evaluate.lungs import evaluate_pairs
    from covid_cxr.lungs.segment import THRESHOLD, predict_probabilities, two_largest

    native = load_pairs(root, None, only=set(test_ids))
    probs = predict_probabilities(torch_probabilities(model), native.images, cfg.image_size)
    return evaluate_pairs(np.stack([two_largest(p >= THRESHOLD) for p in probs]), native)


def describe_data(pairs: LungPairs, split: dict[str, list[int]], cfg: LungConfig) -> dict:
    counts = {s: {src: sum(pairs.sources[i] == src for i in idx) for src in sorted(set(pairs.sources))}
              for s, idx in split.items()}
    return {"dataset_root": str(pairs.root), "manifest_sha256": pairs.manifest_sha256, "pairs": len(pairs.ids),
            "skipped": len(pairs.skipped), "duplicate_groups": len(set(pairs.groups)),
            "split_fractions": cfg.split_fractions, "seed": cfg.seed, "counts": counts,
            "test_ids": [pairs.ids[i] for i in split["test"]]}


def bundle_content(cfg: LungConfig, source: str, pairs: LungPairs, split, history: History, metrics: MaskMetrics,
                   mean: float, std: float) -> BundleContent:
    """The model's half of its metadata (task segmentation; see bundle.schema.Segmentation)."""
    from covid_cxr.core.architectures import get_spec

    best = max(history.epochs, key=lambda h: h.get("val_dice", -1)) if history.epochs else {}
    return BundleContent.model_validate({
        "task": "segmentation",
        "architecture": {"name": f"unet-{cfg.encoder}", "timm_name": get_spec(cfg.encoder).timm_name,
                         "weights": source, "hidden": list(cfg.decoder_channels), "dropout": 0.0,
                         "cam_layer": "", "frozen_backbone": False},
        "classes": ["background", "lung"],
        "input": {"height": cfg.image_size, "width": cfg.image_size, "normalisation": {"mean": mean, "std": std}},
        "segmentation": {"config": cfg, "data": describe_data(pairs, split, cfg), "test_metrics": metrics,
                         "history": {"epochs_run": len(history.epochs), "best_epoch": best.get("epoch", 0),
                                     "best_val_dice": best.get("val_dice")}},
    })


@dataclass
class LungResult:
    bundle_path: Path
    metrics: MaskMetrics
    history: list[dict]
    timings: dict[str, float]


def train_lungs(data_dir: str | Path, models_out: str | Path, cfg: LungConfig, workdir: str | Path | None = None,
                resume: bool = False) -> LungResult:
    """Train the lung segmenter and write its bundle to ``models_out/<cfg.name>/<version>``."""
    from covid_cxr.publish.writer import write_bundle

    clock = Stopwatch()
    models_out = Path(models_out)
    run = start_run(cfg, Path(workdir) if workdir else models_out / ".work", resume, Dist())  # one process
    pairs = load_pairs(data_dir, cfg.image_size, cfg.max_images, cfg.seed)
    split = group_split(pairs, cfg.split_fractions, cfg.seed)
    train_px = pairs.images[split["train"]]
    mean, std = float(train_px.mean()), float(train_px.std()) or 1.0
    clock.lap("data")
    net, source = build_unet(cfg)
    model = MaskModel(net, mean, std)
    history = fit(model, pairs, split, cfg, run, resume)
    clock.lap("train")
    metrics = test_metrics(model, pairs.root, [pairs.ids[i] for i in split["test"]], cfg)
    atomic_write_json(run.report / "history.json", history.epochs)
    atomic_write_json(run.report / "test_metrics.json", metrics.model_dump(mode="json"))
    clock.lap("evaluate")
    content = bundle_content(cfg, source, pairs, split, history, metrics, mean, std)
    parity = pairs.images[split["test"][:PARITY_IMAGES] or split["val"][:PARITY_IMAGES]]
    bundle = write_bundle(models_out, cfg.name, model, content, parity, report_dir=run.report, clock=clock)
    return LungResult(bundle.path, metrics, history.epochs, bundle.metadata.segmentation.timings_s)
