"""Training defaults, in one place: `TrainConfig` is what `covid-cxr train`/`run`/`lr-find` build
their options from and what a bundle's metadata records (`training.config`).

Torch-free, so the bundle schema (read by the ONNX-only server) can import it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from covid_cxr.core.architectures import get_spec
from covid_cxr.core.errors import ConfigError

BALANCE_CHOICES = ("undersample", "weights", "none")
STUDY_MAX_PER_CLASS = 219  # the study: 219 images per class after undersampling

# Optional tracking packages: --logger X needs module M (pip package P).
NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow-skinny")}
_SPEC = re.compile(r"^\s*(?P<cls>[^=]+?)\s*=\s*(?P<r>[0-9.]+)\s*$")


def parse_target(spec: str) -> tuple[str, float]:
    """'COVID-19=0.97' -> ('COVID-19', 0.97); ConfigError naming the expected form otherwise."""
    m = _SPEC.match(spec or "")
    if not m:
        raise ConfigError(f"--target-recall {spec!r}: expected CLASS=RECALL, e.g. COVID-19=0.97")
    r = float(m["r"])
    if not 0 < r <= 1:
        raise ConfigError(f"--target-recall {spec!r}: the recall must be in (0, 1]")
    return m["cls"], r


def check_available(logger: str) -> str:
    """A one-line error now, not a traceback after feature extraction, when the package is missing."""
    if logger in NEEDS:
        module, package = NEEDS[logger]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"--logger {logger} needs the {package} package: pip install {package}")
    return logger


class TrainConfig(BaseModel):
    """Every training setting with its default. Unknown keys are ignored when an older bundle's
    config is read back, so adding a field never breaks old bundles."""

    model_config = ConfigDict(extra="ignore", validate_assignment=True)

    arch: str = Field("efficientnet_lite0", description="vgg16, resnet50, densenet121, efficientnet_lite0/1/2")
    weights: str = Field("imagenet", description="imagenet | none | PATH (.safetensors or state_dict)")
    epochs: int = Field(30, ge=1, description="most epochs (early stopping may end sooner)")
    batch_size: int = Field(32, ge=1, description="images per training step")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    seed: int = Field(0, description="seed of the split, the sampling and the weights' initialisation")
    balance: Literal["undersample", "weights", "none"] = Field(
        "undersample", description="undersample (the study) | weights | none")
    max_per_class: int | None = Field(None, ge=1, description=f"cap per class (the study: {STUDY_MAX_PER_CLASS})")
    image_size: int | None = Field(None, ge=16, description="square input side (default: the architecture's)")
    hidden: list[int] = Field([256], description="head hidden sizes")
    dropout: float | None = Field(None, ge=0, lt=1, description="head dropout (default: the study's)")
    patience: int = Field(8, ge=1, description="early stopping patience on val accuracy")
    finetune: bool = Field(False, description="unfreeze the backbone's last stages, train on augmented images "
                                              "(EfficientNet-Lite: staged, on cached trunk activations)")
    finetune_epochs: int = Field(12, ge=1, description="staged fine-tuning: epochs of stage 2 (cosine schedule)")
    finetune_views: int = Field(4, ge=1, description="staged fine-tuning: cached views per training image "
                                                    "(1 plain + augmented copies)")
    finetune_from_block: int | None = Field(
        None, ge=1, le=6, description="staged fine-tuning: the first backbone block trained, the rest above it "
                                      "too (EfficientNet-Lite: 1-6; default the architecture's last stage, 6)")
    finetune_lr_factor: float = Field(0.1, gt=0, le=1, description="staged fine-tuning: the unfrozen stages' "
                                                                   "learning rate as a fraction of --lr")
    cache_features: bool = Field(True, description="frozen backbone: train the head on cached features")
    lr_find: bool = Field(True, description="run the LR range test first (plot and suggestion in the report)")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="feature extraction: fp32 | bf16")
    lung_crop: Literal["none", "box", "mask"] = Field(
        "none", description="lung-only input: none | box (crop to the lungs' box + margin) | mask (black "
        "outside the lungs); needs --lungs and the frozen backbone's feature cache")
    lungs: str | None = Field(None, description="lung segmentation bundle for --lung-crop (MODELS/lungs)")
    extractor: Literal["auto", "onnxruntime", "torch"] = Field(
        "auto", description="frozen-feature engine: onnxruntime (fp32, ~3-6x faster) | torch | auto "
                            "(onnxruntime from 200 images to extract: its one-off export costs ~10 s)")
    target_recall: str | None = Field(
        None, description="operating point CLASS=RECALL (e.g. COVID-19=0.97), threshold fitted on the validation split")
    target_confidence: float | None = Field(
        0.9, gt=0, lt=1, description="operating point: recall >= target on new films with this probability "
                                     "(the conformal rule); None: met on the validation split only")
    target_batch: int | None = Field(
        None, ge=1, description="operating point: the recall is met on each batch of this many new films of the "
                                "class (e.g. a month's COVID-19 films), not only on the population, with "
                                "--target-confidence's probability (beta-binomial)")
    init_from: str | None = Field(None, description="continue from this bundle (site adaptation): its "
                                                     "architecture, input size, normalisation and weights")
    site_unlabelled: str | None = Field(None, description="--init-from: a folder of the site's unlabelled "
                                        "films; the adapted model's answers take the site's class prevalence, "
                                        "estimated on them (EM)")
    distil_from: str | None = Field(None, description="distil this teacher bundle (an ensemble too) into the "
                                    "model: staged --finetune trained on its soft labels (train/distil.py)")
    distil_temperature: float = Field(2.0, gt=0, description="distillation: temperature both sides' "
                                      "probabilities are softened by")
    distil_weight: float = Field(0.7, ge=0, le=1, description="distillation: the soft labels' share of the "
                                 "loss (the rest: cross-entropy on the true labels)")
    classes: list[str] | None = Field(None, description="classes to use (default: all three)")
    name: str | None = Field(None, description="bundle name (default: the architecture)")
    progress: bool = Field(True, exclude=True, description="progress bars (not recorded)")
    # Where and how many: these change results only through the number of processes (DDP splits
    # every batch across them), so run_id() counts them only when they differ from one process.
    accelerator: Literal["cpu", "gpu", "auto"] = Field("cpu", description="cpu | gpu | auto (DDP: gloo on "
                                                       "CPUs, NCCL on GPUs)")
    devices: int = Field(1, ge=1, description="processes per machine: CPU processes or GPUs (DDP beyond 1)")
    num_nodes: int = Field(1, ge=1, description="machines (torchrun or SLURM starts one command on each)")
    strategy: Literal["auto", "ddp"] = Field("auto", description="auto (one process: none; several: ddp) | ddp")
    # Experiment tracking: recorded, never part of run_id().
    logger: Literal["csv", "tensorboard", "mlflow", "none"] = Field(
        "csv", description="experiment tracking: csv | tensorboard | mlflow | none")
    tracking_uri: str | None = Field(None, exclude=True, description="MLflow tracking URI (default: a local "
                                     "file store, MODELS/.work/mlruns; not recorded: it may hold credentials)")

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        get_spec(v)  # ConfigError naming the choices
        return v

    @field_validator("logger")
    @classmethod
    def _logger_installed(cls, v: str) -> str:
        return check_available(v)

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    @model_validator(mode="after")
    def _lungs_for_crop(self) -> TrainConfig:
        if self.lung_crop != "none" and (not self.lungs or self.finetune or not self.cache_features):
            raise ValueError("--lung-crop needs --lungs MODELS/lungs and the frozen backbone's feature cache "
                             "(not --finetune)")
        return self

    @model_validator(mode="after")
    def _unlabelled_needs_site_head(self) -> TrainConfig:
        if self.site_unlabelled and (not self.init_from or self.finetune or not self.cache_features):
            raise ValueError("--site-unlabelled adapts a site head: it needs --init-from MODELS/<name> and the "
                             "frozen backbone's feature cache (not --finetune)")
        return self

    @model_validator(mode="after")
    def _batch_needs_confidence(self) -> TrainConfig:
        if self.target_batch is not None and self.target_confidence is None:
            raise ValueError("--target-batch needs --target-confidence (the batch guarantee is conformal)")
        return self

    @field_validator("target_recall")
    @classmethod
    def _target_form(cls, v: str | None) -> str | None:
        if v is not None:
            parse_target(v)  # ConfigError naming the expected form
        return v

    @property
    def size(self) -> int:
        return self.image_size or get_spec(self.arch).input_size

    @property
    def bundle_name(self) -> str:
        return self.name or self.arch

    def run_id(self) -> str:
        """Stable id of what is trained (for --resume): everything except cosmetics and the stopping
        rule, so an interrupted run can also be resumed with more epochs."""
        d = self.model_dump(exclude={"name", "epochs", "patience", "logger"})
        for k in PLACEMENT:  # at their defaults (one process) they leave older run ids as they were
            if d[k] == DEFAULT_PLACEMENT[k] or self.world_size == 1:
                d.pop(k)
        for k in DISTIL:  # likewise without a teacher
            if not self.distil_from:
                d.pop(k)
        for k in LATER:  # unset, they leave older run ids as they were
            if d[k] is None:
                d.pop(k)
        return f"{self.arch}-{hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]}"


DEFAULTS = TrainConfig()
PLACEMENT = ("accelerator", "devices", "num_nodes", "strategy")
DEFAULT_PLACEMENT = {k: getattr(DEFAULTS, k) for k in PLACEMENT}
SITE_PREVALENCE_MIN_IMAGES = 20  # --site-unlabelled: fewer films estimate a prevalence too loosely to act on
LATER = ("finetune_from_block", "target_batch", "site_unlabelled")  # fields added after run ids were first recorded
DISTIL = ("distil_from", "distil_temperature", "distil_weight")
