"""The LR range test (Lightning's Tuner.lr_find) on the head, with its loss-vs-LR plot."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np

from covid_cxr.data import PreparedData
from covid_cxr.data.dataset import FeatureDataModule
from covid_cxr.models import create_model
from covid_cxr.core.config import TrainConfig
from covid_cxr.features.cache import cached_features
from covid_cxr.train.module import ClassifierModule
from covid_cxr.core.figures import save_png
from covid_cxr.core.progress import say


@dataclass
class LRFindResult:
    suggestion: float | None
    lrs: list[float]
    losses: list[float]
    plot: Path


def steepest_descent(lrs, losses, skip: int = 5) -> float | None:
    """The rate where the loss falls fastest per decade, searched only *before* its minimum (after
    the first `skip` steps, whose smoothed values are unsettled): Lightning's own suggestion (the
    steepest point anywhere) can land on the hump where the loss starts to climb. Lightning's losses
    are already smoothed (its EMA), so they are used as they are. None when the curve never falls."""
    lrs, losses = np.asarray(lrs, float), np.asarray(losses, float)
    ok = np.isfinite(losses) & (lrs > 0)
    lrs, losses = lrs[ok], losses[ok]
    if len(lrs) < skip + 3:
        return None
    end = skip + int(np.argmin(losses[skip:]))
    if end <= skip + 1:
        return None
    slope = np.gradient(losses[:end + 1], np.log10(lrs[:end + 1]))
    i = skip + int(np.argmin(slope[skip:end]))
    return float(lrs[i]) if slope[i] < 0 else None


@contextmanager
def no_tqdm():
    """tqdm's own switch (TQDM_DISABLE, read when a bar is made), set only while inside."""
    before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = before


def range_test(net, dm, class_weights, out: Path, workdir: Path, title: str, progress: bool = False,
               min_lr: float = 1e-6, max_lr: float = 1.0, num_training: int = 100) -> LRFindResult:
    """Sweep the learning rate exponentially over `num_training` steps (Lightning's Tuner, which
    restores the network's weights afterwards); save the loss-vs-LR plot, with the suggestion
    marked, to `out`."""
    from lightning.pytorch.tuner import Tuner

    module = ClassifierModule(net, 1e-3, class_weights)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(workdir))
    if progress:
        say(f"LR range test: {num_training} steps from {min_lr:g} to {max_lr:g}")
    with no_tqdm():  # Lightning's LR finder opens its own tqdm bar whatever the trainer says
        finder = Tuner(trainer).lr_find(module, datamodule=dm, min_lr=min_lr, max_lr=max_lr,
                                        num_training=num_training, early_stop_threshold=None, update_attr=False)
    lrs, losses = list(map(float, finder.results["lr"])), list(map(float, finder.results["loss"]))
    best = steepest_descent(lrs, losses)
    fig = finder.plot(suggest=False, show=False)
    ax = fig.axes[0]
    if best is not None:
        ax.axvline(best, color="tab:red", linestyle="--", label=f"suggested {best:.2e}")
        ax.legend(loc="upper left")
    ax.set_title(f"LR range test: {title}")
    save_png(fig, Path(out))
    if progress:
        say(f"LR range test done: suggested {best:.2e}" if best else "LR range test done: no suggestion")
    return LRFindResult(best, lrs, losses, Path(out))


def lr_find(prepared: PreparedData, cfg: TrainConfig, out: Path, workdir: Path,
            min_lr: float = 1e-6, max_lr: float = 1.0, num_training: int = 100) -> LRFindResult:
    """`covid-cxr lr-find`: the range test on the head of `cfg.arch`, over cached features."""
    L.seed_everything(cfg.seed, verbose=False)
    model, source = create_model(cfg.arch, cfg.weights, len(prepared.classes), cfg.hidden, cfg.dropout,
                                 prepared.mean, prepared.std)
    feats = cached_features(model, prepared, cfg, source, workdir / "feature-cache")
    dm = FeatureDataModule(feats, cfg.batch_size, cfg.seed)
    return range_test(model.head, dm, prepared.class_weights, out, workdir, f"{cfg.arch} head", cfg.progress,
                      min_lr, max_lr, num_training)
