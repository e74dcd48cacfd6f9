"""Fit orchestration, in the order a reader follows it:

    data -> model -> inputs (cached features, or images) -> LR range test -> fit -> evaluate
         -> bundle content -> write the bundle

`covid-cxr train` and `covid-cxr run` call `train`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch

from covid_cxr.bundle.schema import BundleContent
from covid_cxr.core.results import Metrics
from covid_cxr.data import PreparedData, prepare
from covid_cxr.data.dataset import FeatureDataModule, ImageDataModule, labels_of
from covid_cxr.data.decode import load_batch
from covid_cxr.core.errors import UserError
from covid_cxr.evaluate.plots import curves_png
from covid_cxr.evaluate.report import write_report
from covid_cxr.models import Classifier, get_spec
from covid_cxr.core.config import TrainConfig
from covid_cxr.train.distributed import Dist, launch, strategy
from covid_cxr.train.decisions import decision_metrics
from covid_cxr.features.cache import cached_features
from covid_cxr.train.module import ClassifierModule, History
from covid_cxr.train.tracking import log_result, make_logger
from covid_cxr.core.files import Stopwatch, atomic_write_json, missing_folders, remove_if_empty
from covid_cxr.core.progress import say, step

__all__ = ["TrainConfig", "TrainResult", "train"]
PARITY_IMAGES = 8


@dataclass
class TrainResult:
    bundle_path: Path | None  # None in the processes of a multi-process run other than the main one
    metrics: Metrics | None
    history: list[dict]
    timings: dict[str, float]


@dataclass
class RunDir:
    """One run's working folder (MODELS/.work/<run id>): checkpoints and the report being built."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def report(self) -> Path:
        return self.root / "report"


@dataclass
class Inputs:
    """What the network trains on: the head on cached features, or the classifier on images."""

    net: torch.nn.Module
    datamodule: L.LightningDataModule
    features: dict | None  # split -> (features, labels) when cached


def start_run(cfg: TrainConfig, workdir: Path, resume: bool, dist: Dist) -> RunDir:
    """Seed everything; a fresh run (no --resume) clears old checkpoints so it never resumes silently,
    a resumed one first checks that its checkpoint is whole."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    run = RunDir(workdir / cfg.run_id())
    if dist.is_main and not resume and run.checkpoints.exists():
        shutil.rmtree(run.checkpoints)
    if dist.is_main:  # a report left by a killed run: every run rebuilds its report from the start
        shutil.rmtree(run.report, ignore_errors=True)
    if resume and (run.checkpoints / "last.ckpt").is_file():
        check_checkpoint(run.checkpoints / "last.ckpt")  # before any work, not after features and LR test
    run.root.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    return run


def training_inputs(model: Classifier, prepared: PreparedData, cfg: TrainConfig, cache_dir: Path,
                    source: str, dist: Dist | None = None) -> Inputs:
    from covid_cxr.train.distil import check_student
    from covid_cxr.train.finetune import staged_supported, trainable_modules

    check_student(cfg, prepared)  # --distil-from: refused before any feature is extracted
    if cfg.cache_features and (not cfg.finetune or staged_supported(cfg.arch)):  # staged: head first
        feats = cached_features(model, prepared, cfg, source, cache_dir, dist)
        return Inputs(model.head, FeatureDataModule(feats, cfg.batch_size, cfg.seed), feats)
    if cfg.finetune:
        model.freeze_backbone(trainable=trainable_modules(cfg))
    return Inputs(model, ImageDataModule(prepared, cfg.size, cfg.batch_size, augment=cfg.finetune), None)


def lr_range_test(inputs: Inputs, prepared: PreparedData, cfg: TrainConfig, run: RunDir,
                  dist: Dist) -> float | None:
    """The LR range test on cached features (cheap; the Tuner restores the weights afterwards), in
    the main process alone: it only informs the report."""
    from covid_cxr.train.lr_find import range_test

    suggestion = None
    if dist.is_main:
        suggestion = range_test(inputs.net, inputs.datamodule, prepared.class_weights, run.report / "lr_find.png",
                                run.root, f"{cfg.arch} head").suggestion
    dist.barrier()
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # training starts as without it
    return suggestion


def _trainer(cfg: TrainConfig, run: RunDir, history: History, logger=False) -> L.Trainer:
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from covid_cxr.train.progress import EpochLog

    best = ModelCheckpoint(dirpath=run.checkpoints, filename="best", monitor="val_acc", mode="max",
                           enable_version_counter=False, save_on_train_epoch_end=True)
    # A separate, unmonitored checkpoint written after every epoch: what --resume continues from.
    last = ModelCheckpoint(dirpath=run.checkpoints, filename="last", save_top_k=1, monitor=None,
                           enable_version_counter=False, save_on_train_epoch_end=True)
    early = EarlyStopping(monitor="val_acc", mode="max", patience=cfg.patience)
    return L.Trainer(max_epochs=cfg.epochs, accelerator=cfg.accelerator, devices=cfg.devices,
                     num_nodes=cfg.num_nodes, strategy=strategy(cfg), logger=logger, log_every_n_steps=1,
                     callbacks=[best, last, early, history, *([EpochLog()] if cfg.progress else [])],
                     enable_progress_bar=False,
                     enable_model_summary=False, deterministic=True, num_sanity_val_steps=0,
                     default_root_dir=str(run.root))


def check_checkpoint(path: Path) -> None:
    """A checkpoint is a zip archive (torch.save): check every member's CRC before Lightning unpickles
    it, so a truncated file (a kill while it was written) is one line saying what to do."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        bad = str(exc)
    if bad is not None:
        raise UserError(f"{path}: unreadable checkpoint (truncated? {bad}): delete it to resume from the start, "
                        "or run without --resume")


def fit(inputs: Inputs, prepared: PreparedData, cfg: TrainConfig, run: RunDir, resume: bool,
        logger=False, module: L.LightningModule | None = None) -> History:
    """Lightning fit with the study's callbacks; the best epoch's weights are put back afterwards."""
    module = module or ClassifierModule(inputs.net, cfg.lr, prepared.class_weights)
    history = History()
    trainer = _trainer(cfg, run, history, logger)
    last = run.checkpoints / "last.ckpt"
    trainer.fit(module, datamodule=inputs.datamodule, ckpt_path=str(last) if resume and last.is_file() else None)
    best_path = trainer.checkpoint_callback.best_model_path
    if best_path:  # our own checkpoint, written by this run; plain tensors only
        module.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"])
    return history


def test_probabilities(model: Classifier, prepared: PreparedData, size: int, feats=None,
                      split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """A split's labels and probabilities (from cached features when the backbone was frozen)."""
    model.eval()
    y = labels_of(prepared, split)
    with torch.inference_mode():
        if feats is not None:
            logits = model.head(feats[split][0])
        else:
            paths = [prepared.manifest.root / r.path for r in prepared.splits[split]]
            x = torch.from_numpy(load_batch(paths, size, size))[:, None]
            logits = torch.cat([model(b) for b in x.split(32)])
    return y, torch.softmax(logits, 1).numpy()


def evaluate(model: Classifier, inputs: Inputs, prepared: PreparedData, cfg: TrainConfig, history: History,
             run: RunDir, title: str, trust=None, before: Metrics | None = None, section: str = "") -> Metrics:
    """Test metrics (temperature-scaled, as the bundle answers; the operating point beside the argmax),
    and the report folder that goes into the bundle (table, calibration, curves, history).
    `before`: the --init-from bundle's metrics on the same split (site adaptation)."""
    from covid_cxr.train.adapt import before_after_md

    metrics = decision_metrics(model, inputs, prepared, cfg, trust)
    curves_png(history.epochs, run.report / "curves.png", f"{cfg.bundle_name}: training curves")
    atomic_write_json(run.report / "history.json", history.epochs)
    if before is not None:
        metrics = metrics.model_copy(update={"before_adaptation": before})
    # a site head's own section replaces the generic before/after (its macro-F1 counts only the site's classes)
    write_report(metrics, run.report, title, section or (before_after_md(before, metrics) if before else ""))
    return metrics


def fit_trust_layer(model: Classifier, inputs: Inputs, prepared: PreparedData, cfg: TrainConfig, cache_dir: Path,
                    stages=None):
    """Temperature from each split's pooled features, out-of-distribution gate from their stage
    statistics (covid_cxr.trust; both cached per image). `stages`: those statistics when staged
    fine-tuning already has them (train/finetune.py), sparing a pass through the whole backbone."""
    from covid_cxr.trust.fit import fit_trust, split_features
    from covid_cxr.trust.stages import stage_features

    feats = split_features(model, prepared, cfg.size, inputs.features)
    if stages is None:
        stages = stage_features(model, prepared, cfg, cache_dir)
    return fit_trust(model, feats, stages)


def trust_and_reference(model: Classifier, inputs: Inputs, prepared: PreparedData, cfg: TrainConfig, cache_dir: Path,
                        stages, site_head: bool):
    """(trust layer, site_reference, extra report section). A site head (--init-from, frozen) is
    fitted here with its trust layer, and its report gets the before/baseline/after section."""
    if not site_head:
        trust = fit_trust_layer(model, inputs, prepared, cfg, cache_dir, stages)
        return trust, site_reference(prepared, cfg, trust), ""
    from covid_cxr.train.adapt import adapt_site, site_section

    with step("site head"):
        trust, head0, stages = adapt_site(model, inputs, prepared, cfg, cache_dir)
    reference = site_reference(prepared, cfg, trust, site_head)
    return trust, reference, site_section(head0, model, inputs.features, prepared, cfg, trust, stages, reference)


def bundle_content(cfg: TrainConfig, prepared: PreparedData, source: str, history: History, metrics: Metrics,
                   cached: bool, lr_suggestion: float | None, trust=None, reference=None) -> BundleContent:
    """The model's half of its metadata (the writer completes it; covid_cxr.bundle.schema)."""
    from covid_cxr.train.distil import teacher_record

    spec = get_spec(cfg.arch)
    epochs = history.epochs
    best = max(epochs, key=lambda h: h.get("val_acc", -1)) if epochs else {}
    return BundleContent(
        architecture={"name": cfg.arch, "timm_name": spec.timm_name, "weights": source,
                      "hidden": list(cfg.hidden), "cam_layer": spec.cam_layer,
                      "dropout": spec.head_dropout if cfg.dropout is None else cfg.dropout,
                      "frozen_backbone": not cfg.finetune},
        classes=list(prepared.classes),
        input={"height": cfg.size, "width": cfg.size, "normalisation": {"mean": prepared.mean, "std": prepared.std}},
        training={"config": cfg, "data": prepared.describe(), "feature_cache": cached,
                  "history": {"epochs_run": len(epochs), "best_epoch": best.get("epoch", 0),
                              "best_val_acc": best.get("val_acc"), "lr_range_test_suggestion": lr_suggestion},
                  "timings_s": {}},
        test_metrics=metrics,
        operating_point=metrics.operating_point.rule_only() if metrics.operating_point else None,
        trust=trust.info if trust is not None else None,
        # lung-only input: the writer copies the lung model in, so every reader crops the same way
        lung_crop={"mode": cfg.lung_crop, "lungs": cfg.lungs} if cfg.lung_crop != "none" else None,
        site_reference=reference,
        distilled_from=teacher_record(cfg),  # the teacher, for a student (--distil-from)
    )


def report_skipped(prepared: PreparedData, shown: int = 20) -> None:
    """Name the files training could not read (they are left out, and metadata.json counts them)."""
    skipped = [r for r in prepared.manifest.records if r.status == "skipped"]
    for r in skipped[:shown]:
        say(f"skipped {r.path}: {r.reason}")
    if len(skipped) > shown:
        say(f"... and {len(skipped) - shown} more skipped files (covid-cxr data inspect lists them all)")


def site_reference(prepared: PreparedData, cfg: TrainConfig, trust, site_head: bool = False):
    """metadata.json's `site_reference`: the validation split's answers (as the bundle gives them)
    and image statistics, what `covid-cxr site check` compares a new site against. A site head's
    reference is the site: the films it was adapted on (train + val), with their out-of-fold answers
    and no class mix (they were labelled per class: their mix is not the site's prevalence)."""
    from covid_cxr.site.reference import build_reference, reference_from_files

    if trust.site_sample is not None:  # --site-unlabelled: the site's own films
        on = f"the site's {trust.site_sample.n} unlabelled films (--site-unlabelled), as the adapted model answers them"
        return build_reference(trust.site_sample, list(prepared.classes), on)
    splits, on = (("train", "val"), "site films adapted on (out-of-fold answers)") if site_head else (("val",), "val split")
    paths = [prepared.manifest.root / r.path for s in splits for r in prepared.splits[s]]
    return reference_from_files(paths, cfg.size, cfg.size, trust.val_probs, trust.val_ood, list(prepared.classes), on,
                                class_mix=not site_head)


def train(data_dir: str | Path, models_out: str | Path, cfg: TrainConfig, workdir: str | Path | None = None,
          prepared: PreparedData | None = None, resume: bool = False) -> TrainResult:
    """Train one architecture and write its bundle to ``models_out/<name>/<version>``; a failure or
    an interrupt leaves only what --resume needs (tidy_failed_run)."""
    from covid_cxr.train.adapt import adapted_config

    dist = launch(cfg)  # several processes: from here on, this runs in each
    clock = Stopwatch()
    cfg = adapted_config(cfg)  # --init-from: architecture, size and head from the bundle
    models_out = Path(models_out)
    workdir = Path(workdir) if workdir else models_out / ".work"
    created = missing_folders(models_out) + missing_folders(workdir)
    run = start_run(cfg, workdir, resume, dist)
    try:
        return _train_run(data_dir, models_out, cfg, workdir, run, dist, clock, prepared, resume)
    except BaseException:  # an error or an interrupt (Lightning turns Ctrl-C into SystemExit)
        if dist.is_main:
            tidy_failed_run(run, created)
        raise


def tidy_failed_run(run: RunDir, created: list[Path]) -> None:
    """What a failed or interrupted run leaves: its checkpoints (what --resume continues from), the
    feature cache (content-addressed: the next run reuses it) and the tracking store (the run's
    record). What goes: the half-built report (every run rebuilds it), the run folder when it holds
    no checkpoint (nothing to resume from), and the folders this run created, when left empty."""
    shutil.rmtree(run.report, ignore_errors=True)
    if not any(run.root.rglob("*.ckpt")):
        shutil.rmtree(run.root, ignore_errors=True)
    remove_if_empty(created)


def _train_run(data_dir, models_out: Path, cfg: TrainConfig, workdir: Path, run: RunDir, dist: Dist,
               clock: Stopwatch, prepared: PreparedData | None, resume: bool) -> TrainResult:
    """train() after its run folder is set up: data, features, fit, trust layer, report, bundle."""
    from covid_cxr.publish.writer import write_bundle
    from covid_cxr.train.adapt import before_metrics, start_model

    prepared = prepared or prepare(data_dir, cfg.classes, cfg.balance, cfg.max_per_class, cfg.seed,
                                   progress=cfg.progress, allow_missing=bool(cfg.init_from))
    if cfg.init_from:
        from covid_cxr.train.adapt import exclude_seen

        exclude_seen(prepared, cfg)  # val/test: only images the bundle never trained on
    report_skipped(prepared)
    clock.lap("data")
    model, source = start_model(cfg, prepared)
    inputs = training_inputs(model, prepared, cfg, workdir / "feature-cache", source, dist)
    clock.lap("features")
    before = before_metrics(model, inputs, prepared, cfg) if cfg.init_from else None
    lr_suggestion = None
    if cfg.lr_find and inputs.features is not None:
        lr_suggestion = lr_range_test(inputs, prepared, cfg, run, dist)
        clock.lap("lr_find")
    logger = make_logger(cfg, workdir)
    site_head = bool(cfg.init_from) and inputs.features is not None and not cfg.finetune
    if site_head:  # the site head is fitted with its trust layer below (train/adapt.py)
        history = History()
    else:
        with step("head" if cfg.finetune else "training"):
            history = fit(inputs, prepared, cfg, run, resume, logger)
    stages = None  # the OOD gate's inputs, when staged fine-tuning computes them on its way
    if cfg.finetune and inputs.features is not None:  # staged fine-tuning, stage 2 (train/finetune.py)
        from covid_cxr.train.finetune import finetune_stage

        with step("fine-tuning"):
            feats, stages, history = finetune_stage(model, prepared, cfg, run, workdir / "feature-cache", history,
                                                    resume)
        inputs = Inputs(inputs.net, inputs.datamodule, feats)
    clock.lap("train")
    if not dist.is_main:  # the main process evaluates and writes the one bundle
        return TrainResult(None, None, history.epochs, clock.summary())
    if cfg.progress:
        say("fitting the gate and the temperature on the validation split; evaluating on the test split")
    trust, reference, section = trust_and_reference(model, inputs, prepared, cfg, workdir / "feature-cache", stages,
                                                    site_head)
    clock.lap("trust")
    metrics = evaluate(model, inputs, prepared, cfg, history, run, f"{cfg.bundle_name} ({source}) — test split",
                       trust, before, section)
    clock.lap("evaluate")
    content = bundle_content(cfg, prepared, source, history, metrics, inputs.features is not None, lr_suggestion,
                             trust, reference)
    parity = load_batch([prepared.manifest.root / r.path for r in prepared.splits["test"][:PARITY_IMAGES]],
                        cfg.size, cfg.size)
    bundle = write_bundle(models_out, cfg.bundle_name, model, content, parity, report_dir=run.report, clock=clock,
                          trust=trust)
    log_result(logger, metrics, bundle.path, len(history.epochs))
    return TrainResult(bundle.path, metrics, history.epochs, bundle.metadata.training.timings_s)
