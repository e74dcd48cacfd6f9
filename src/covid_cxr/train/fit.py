"""Fit orchestration: dataset folder -> prepared splits -> (cached features) -> Lightning fit ->
test metrics and report -> model bundle. `covid-cxr train` and `covid-cxr run` call `train`."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch

from covid_cxr.data import PreparedData, prepare
from covid_cxr.data.dataset import FeatureDataModule, ImageDataModule, labels_of
from covid_cxr.data.decode import load_for_model
from covid_cxr.evaluate.metrics import compute_metrics
from covid_cxr.evaluate.plots import curves_png
from covid_cxr.evaluate.report import write_report
from covid_cxr.models import Classifier, create_model, get_spec
from covid_cxr.train.features import FeatureCache, cache_key, extract
from covid_cxr.train.module import ClassifierModule, History
from covid_cxr.utils import atomic_write_json


@dataclass
class TrainConfig:
    arch: str = "efficientnet_lite0"
    weights: str = "imagenet"  # imagenet | none | PATH
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    balance: str = "undersample"  # undersample | weights | none
    max_per_class: int | None = None
    image_size: int | None = None  # default: the architecture's
    hidden: list[int] = field(default_factory=lambda: [256])
    dropout: float | None = None  # default: the study's best for the architecture
    patience: int = 8  # early stopping on val accuracy
    finetune: bool = False  # unfreeze the backbone's last stages, train on augmented images
    cache_features: bool = True  # frozen backbone: train the head on cached features
    lr_find: bool = True  # run the LR range test first; its plot and suggestion go in the report
    precision: str = "fp32"  # feature extraction: fp32 | bf16
    classes: list[str] | None = None
    name: str | None = None  # bundle name; default: arch
    progress: bool = True

    @property
    def size(self) -> int:
        return self.image_size or get_spec(self.arch).input_size

    def run_id(self) -> str:
        """Stable id of what is trained (for --resume): everything except cosmetics and the stopping
        rule, so an interrupted run can also be resumed with more epochs."""
        d = {k: v for k, v in asdict(self).items() if k not in ("progress", "name", "epochs", "patience")}
        return f"{self.arch}-{hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]}"


@dataclass
class TrainResult:
    bundle_path: Path
    metrics: dict
    history: list[dict]
    timings: dict[str, float]


def _features(model: Classifier, prepared: PreparedData, cfg: TrainConfig, source: str,
              cache_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    cache = FeatureCache(cache_dir / f"{cache_key(cfg.arch, source, cfg.size, prepared.mean, prepared.std)}"
                                     f".safetensors")
    out = {}
    items = {s: [(prepared.manifest.root / r.path, r.sha256) for r in prepared.splits[s]] for s in prepared.splits}
    everything = [it for s in ("train", "val", "test") for it in items[s]]
    extract(model, everything, cfg.size, cache, progress=cfg.progress, precision=cfg.precision)
    for s in ("train", "val", "test"):
        x = torch.stack([cache.rows[sha] for _, sha in items[s]])
        out[s] = (x, torch.from_numpy(labels_of(prepared, s)))
    return out


def _trainer(cfg: TrainConfig, workdir: Path, history: History, max_epochs: int | None = None) -> L.Trainer:
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    best = ModelCheckpoint(dirpath=workdir / "checkpoints", filename="best", monitor="val_acc", mode="max",
                           enable_version_counter=False, save_on_train_epoch_end=True)
    # A separate, unmonitored checkpoint written after every epoch: what --resume continues from.
    last = ModelCheckpoint(dirpath=workdir / "checkpoints", filename="last", save_top_k=1, monitor=None,
                           enable_version_counter=False, save_on_train_epoch_end=True)
    early = EarlyStopping(monitor="val_acc", mode="max", patience=cfg.patience)
    return L.Trainer(max_epochs=max_epochs or cfg.epochs, accelerator="cpu", devices=1, logger=False,
                     callbacks=[best, last, early, history], enable_progress_bar=cfg.progress,
                     enable_model_summary=False, deterministic=True, num_sanity_val_steps=0,
                     default_root_dir=str(workdir))


def _evaluate_test(model: Classifier, prepared: PreparedData, size: int, feats=None) -> tuple[np.ndarray, np.ndarray]:
    """Test-split labels and probabilities (from cached features when the backbone was frozen)."""
    model.eval()
    y = labels_of(prepared, "test")
    with torch.inference_mode():
        if feats is not None:
            logits = model.head(feats["test"][0])
        else:
            paths = [prepared.manifest.root / r.path for r in prepared.splits["test"]]
            x = torch.from_numpy(np.stack([load_for_model(p, size, size) for p in paths]))[:, None]
            logits = torch.cat([model(b) for b in x.split(32)])
    return y, torch.softmax(logits, 1).numpy()


def train(data_dir: str | Path, models_out: str | Path, cfg: TrainConfig, workdir: str | Path | None = None,
          prepared: PreparedData | None = None, resume: bool = False) -> TrainResult:
    """Train one architecture and write its bundle to ``models_out/<name>/<version>``."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    models_out = Path(models_out)
    workdir = Path(workdir) if workdir else models_out / ".work"
    run_dir = workdir / cfg.run_id()
    if run_dir.exists() and not resume and (run_dir / "checkpoints").exists():
        import shutil

        shutil.rmtree(run_dir / "checkpoints")  # a fresh run: never resume silently
    run_dir.mkdir(parents=True, exist_ok=True)

    prepared = prepared or prepare(data_dir, cfg.classes, cfg.balance, cfg.max_per_class, cfg.seed,
                                   progress=cfg.progress)
    timings["data"] = time.perf_counter() - t0

    t = time.perf_counter()
    model, source = create_model(cfg.arch, cfg.weights, len(prepared.classes), cfg.hidden, cfg.dropout,
                                 prepared.mean, prepared.std)
    spec = get_spec(cfg.arch)
    use_cache = cfg.cache_features and not cfg.finetune
    feats = None
    if use_cache:
        feats = _features(model, prepared, cfg, source, workdir / "feature-cache")
        net, dm = model.head, FeatureDataModule(feats, cfg.batch_size, cfg.seed)
    else:
        if cfg.finetune:
            model.freeze_backbone(trainable=spec.finetune_modules)
        net, dm = model, ImageDataModule(prepared, cfg.size, cfg.batch_size, augment=cfg.finetune)
    timings["features"] = time.perf_counter() - t

    report_dir = run_dir / "report"
    lr_suggestion = None
    if cfg.lr_find and use_cache:  # cheap on cached features; the Tuner restores the weights after
        from covid_cxr.train.lr_find import range_test

        t = time.perf_counter()
        lr_suggestion = range_test(net, dm, prepared.class_weights, report_dir / "lr_find.png", run_dir,
                                   f"{cfg.arch} head").suggestion
        timings["lr_find"] = time.perf_counter() - t
        L.seed_everything(cfg.seed, workers=True, verbose=False)  # training starts as without it

    t = time.perf_counter()
    module = ClassifierModule(net, cfg.lr, prepared.class_weights)
    history = History()
    trainer = _trainer(cfg, run_dir, history)
    last = run_dir / "checkpoints" / "last.ckpt"
    trainer.fit(module, datamodule=dm, ckpt_path=str(last) if resume and last.is_file() else None)
    best_path = trainer.checkpoint_callback.best_model_path
    if best_path:
        # our own checkpoint, written by this run: plain tensors only
        state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    best_epoch = max(history.epochs, key=lambda h: h.get("val_acc", -1))["epoch"] if history.epochs else 0
    timings["train"] = time.perf_counter() - t

    t = time.perf_counter()
    y, probs = _evaluate_test(model, prepared, cfg.size, feats)
    metrics = compute_metrics(y, probs, prepared.classes)
    name = cfg.name or cfg.arch
    curves_png(history.epochs, report_dir / "curves.png", f"{name}: training curves")
    atomic_write_json(report_dir / "history.json", history.epochs)
    write_report(metrics, report_dir, f"{name} ({source}) — test split")
    timings["evaluate"] = time.perf_counter() - t

    t = time.perf_counter()
    parity = np.stack([load_for_model(prepared.manifest.root / r.path, cfg.size, cfg.size)
                       for r in prepared.splits["test"][:8]])
    hp = asdict(cfg)
    hp.pop("progress")
    metadata = {
        "architecture": {"name": cfg.arch, "timm_name": spec.timm_name, "weights": source,
                         "hidden": list(cfg.hidden),
                         "dropout": spec.head_dropout if cfg.dropout is None else cfg.dropout, "cam_layer": spec.cam_layer,
                         "frozen_backbone": not cfg.finetune},
        "classes": list(prepared.classes),
        "input": {"height": cfg.size, "width": cfg.size, "channels": 1, "layout": "NHWC", "dtype": "float32",
                  "value_range": [0.0, 1.0], "color": "grayscale (RGB averaged by luminance, alpha on black)",
                  "resize": "bilinear (PIL), no crop",
                  "normalisation": {"mean": prepared.mean, "std": prepared.std,
                                    "applied": "inside the model", "computed_on": "train split"}},
        "output": {"name": "probabilities", "meaning": "softmax over classes, in 'classes' order"},
        "training": {**prepared.describe(), "hyperparameters": hp, "epochs_run": len(history.epochs),
                     "best_epoch": best_epoch,
                     "best_val_acc": max((h.get("val_acc", 0) for h in history.epochs), default=None),
                     "feature_cache": use_cache, "lr_range_test_suggestion": lr_suggestion},
        "test_metrics": metrics,
        "timings_s": timings,
    }
    from covid_cxr.bundle import write_bundle

    bundle = write_bundle(models_out, name, model, metadata, parity, report_dir=report_dir)
    timings["bundle"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    return TrainResult(bundle.path, metrics, history.epochs, timings)
