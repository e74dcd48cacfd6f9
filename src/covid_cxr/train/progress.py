"""Training progress as lines a log can keep: one per epoch (counted from 1, out of the most
epochs), and a word when early stopping ends the run. Lightning's own bar counts from 0 and
shows internals (`v_num`), and says nothing when it stops early."""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping

from covid_cxr.core.progress import duration, say


class EpochLog(L.Callback):
    """After each training epoch: 'epoch 4/30: train_loss 0.412, val_acc 0.931 (best 0.945, epoch 2), 12s'."""

    def __init__(self, monitor: str = "val_acc", what: str = "epoch"):
        self.monitor, self.what = monitor, what
        self.best: tuple[float, int] | None = None
        self._start = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        epoch = trainer.current_epoch + 1
        shown = ", ".join(f"{k} {m[k]:.3f}" for k in ("train_loss", "val_loss", self.monitor) if k in m)
        if self.monitor in m and (self.best is None or m[self.monitor] > self.best[0]):
            self.best = (m[self.monitor], epoch)
        best = f" (best {self.best[0]:.3f}, {self.what} {self.best[1]})" if self.best else ""
        say(f"{self.what} {epoch}/{trainer.max_epochs}: {shown}{best}, {duration(time.perf_counter() - self._start)}")

    def on_train_end(self, trainer, pl_module) -> None:
        early = next((c for c in trainer.callbacks if isinstance(c, EarlyStopping)), None)
        if trainer.is_global_zero and early is not None and early.stopped_epoch > 0:
            say(f"early stopping after {self.what} {early.stopped_epoch + 1}: {early.monitor} did not improve "
                f"for {early.patience} epochs" + (f"; the best, {self.what} {self.best[1]}, is kept" if self.best else ""))
