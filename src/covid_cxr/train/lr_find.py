"""The LR range test (Lightning's Tuner.lr_find) on the head, with its loss-vs-LR plot."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import lightning as L

from covid_cxr.data import PreparedData
from covid_cxr.data.dataset import FeatureDataModule
from covid_cxr.models import create_model
from covid_cxr.core.config import TrainConfig
from covid_cxr.features.cache import cached_features
from covid_cxr.train.module import ClassifierModule
from covid_cxr.core.files import atomic_write_bytes


@dataclass
class LRFindResult:
    suggestion: float | None
    lrs: list[float]
    losses: list[float]
    plot: Path


def range_test(net, dm, class_weights, out: Path, workdir: Path, title: str, progress: bool = False,
               min_lr: float = 1e-6, max_lr: float = 1.0, num_training: int = 100) -> LRFindResult:
    """Sweep the learning rate exponentially over `num_training` steps (Lightning's Tuner, which
    restores the network's weights afterwards); save the loss-vs-LR plot to `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from lightning.pytorch.tuner import Tuner

    module = ClassifierModule(net, 1e-3, class_weights)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=progress, enable_model_summary=False, default_root_dir=str(workdir))
    finder = Tuner(trainer).lr_find(module, datamodule=dm, min_lr=min_lr, max_lr=max_lr,
                                    num_training=num_training, early_stop_threshold=None, update_attr=False)
    fig = finder.plot(suggest=True, show=False)
    fig.axes[0].set_title(f"LR range test: {title}, suggested {finder.suggestion() or float('nan'):.2e}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(Path(out), buf.getvalue())
    return LRFindResult(finder.suggestion(), list(map(float, finder.results["lr"])),
                        list(map(float, finder.results["loss"])), Path(out))


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
