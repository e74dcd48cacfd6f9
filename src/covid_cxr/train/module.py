"""The LightningModule: any network that maps a batch to logits, trained with Adam + cross-entropy.

The same module trains the head on cached features (net = Head) and the whole classifier on images
(net = Classifier, for --finetune or to compare against the feature cache).
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn


class ClassifierModule(L.LightningModule):
    def __init__(self, net: nn.Module, lr: float = 1e-3, class_weights: list[float] | None = None,
                 plateau_patience: int = 3, plateau_factor: float = 0.5):
        super().__init__()
        self.net = net
        self.lr = lr
        self.plateau_patience, self.plateau_factor = plateau_patience, plateau_factor
        w = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.loss_fn = nn.CrossEntropyLoss(weight=w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def on_train_epoch_start(self):
        self._epoch_sums = torch.zeros(3)  # loss * n, correct, n: this epoch's training batches

    def epoch_train_stats(self) -> dict[str, float]:
        """Mean training loss/accuracy of the current epoch (for History: Lightning's own epoch
        aggregates of train metrics are only ready after the callbacks' epoch-end hooks)."""
        sums = getattr(self, "_epoch_sums", torch.zeros(3))
        if self._trainer is not None and self.trainer.world_size > 1:  # DDP: every process's batches
            sums = self.trainer.strategy.reduce(sums.clone(), reduce_op="sum")
        loss_sum, correct, n = sums.tolist()
        return {"train_loss": loss_sum / n, "train_acc": correct / n} if n else {}

    def compute_loss(self, logits: torch.Tensor, y: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        """The batch's loss; `extra`: what a subclass's data adds to (x, y) (distillation: soft labels)."""
        return self.loss_fn(logits, y)

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y, *extra = batch
        logits = self(x)
        loss = self.compute_loss(logits, y, *extra)
        acc = (logits.argmax(1) == y).float().mean()
        if stage == "train":
            self._epoch_sums += torch.tensor([loss.item() * len(y), acc.item() * len(y), len(y)])
        on_step = stage == "train"
        # sync_dist: under DDP the monitored val_acc is every process's, not the main one's shard
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=on_step, batch_size=len(y),
                 sync_dist=True)
        self.log(f"{stage}_acc", acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y),
                 sync_dist=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def configure_optimizers(self):
        opt = torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.lr)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=self.plateau_factor, patience=self.plateau_patience)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss"}}


class History(Callback):
    """Per-epoch train/val loss and accuracy, kept in checkpoints so a resumed run has full curves."""

    def __init__(self, keys: tuple[str, ...] = ("val_loss", "val_acc")):
        self.epochs: list[dict[str, float]] = []
        self.keys = keys  # validation metrics recorded per epoch (the lung model's: val_loss, val_dice)

    def on_train_epoch_end(self, trainer, pl_module):
        # Lightning runs checkpoint callbacks last, so the end-of-epoch checkpoint holds this row.
        m = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch + 1, "lr": trainer.optimizers[0].param_groups[0]["lr"]}
        row.update(pl_module.epoch_train_stats())
        row.update({k: float(m[k]) for k in self.keys if k in m})
        self.epochs.append(row)

    def state_dict(self):
        return {"epochs": self.epochs}

    def load_state_dict(self, state_dict):
        self.epochs = list(state_dict.get("epochs", []))
