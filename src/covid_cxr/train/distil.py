"""Knowledge distillation (`--distil-from TEACHER`; `--recipe accurate` distils its ensemble): one
student trained by staged fine-tuning (train/finetune.py) on the teacher's soft labels.

Why: an ensemble answers better than its members but costs what they all cost to serve; a student
of one backbone serves at one member's cost and keeps most of the ensemble's answers.

The targets follow the student's own cached views: view v of an image is the same augmentation
(same seed, from the image's sha256; sizes scale with the image) for student and teacher, so the
teacher is asked about exactly what the student sees (a "consistent" teacher, Beyer et al. 2022).
For an EfficientNet-Lite teacher fine-tuned by stages (each member of the accurate recipe) the
teacher's answer on a view is its fine-tuned top on its own cached trunk activations: no image is
decoded and no trunk runs again when the members' caches are there. Any other teacher answers
through its model.onnx on the augmented images (slower, same targets).

Loss: `w * T^2 * KL(teacher_T || student_T) + (1 - w) * cross-entropy(true label)`, T the
temperature (Hinton et al. 2015). Validation monitors the true labels, like any run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from covid_cxr.bundle.reader import Bundle, load_bundle
from covid_cxr.bundle.store import member_dir
from covid_cxr.core.errors import ConfigError
from covid_cxr.train.finetune import FinetuneModule

SPLIT_KEYS = ("manifest_sha256", "seed", "balance", "max_per_class", "split_fractions")


class DistilModule(FinetuneModule):
    """Staged fine-tuning whose training loss mixes the teacher's soft labels with the true ones."""

    def __init__(self, net, lr: float, class_weights, lr_factor: float, epochs: int, temperature: float,
                 weight: float):
        super().__init__(net, lr, class_weights, lr_factor, epochs)
        self.temperature, self.weight = temperature, weight

    def compute_loss(self, logits: torch.Tensor, y: torch.Tensor, *soft: torch.Tensor) -> torch.Tensor:
        hard = self.loss_fn(logits, y)
        if not soft:  # validation: the true labels alone
            return hard
        return self.weight * distil_loss(logits, soft[0], self.temperature) + (1 - self.weight) * hard


def distil_loss(logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher softened by T || student softened by T), mean over the batch."""
    target = F.log_softmax(torch.log(teacher_probs.clamp_min(1e-12)) / temperature, dim=1)
    student = F.log_softmax(logits / temperature, dim=1)
    return F.kl_div(student, target, log_target=True, reduction="batchmean") * temperature ** 2


def open_teacher(path: str | Path, prepared) -> Bundle:
    """The teacher bundle, refused unless it answers for the data's classes on whole images and was
    trained on the same split (else the student's test split would hold images the teacher learnt)."""
    teacher = load_bundle(path)
    if list(teacher.classes) != list(prepared.classes):
        raise ConfigError(f"--distil-from {teacher.path}: classes {teacher.classes} differ from the data's "
                          f"{list(prepared.classes)}")
    if teacher.metadata.lung_crop is not None:
        raise ConfigError(f"--distil-from {teacher.path}: a lung-only teacher (--lung-crop) cannot be asked "
                          "about the student's whole-image views")
    want = {k: prepared.describe()[k] for k in SPLIT_KEYS}
    got = teacher_split(teacher)
    if {k: got.get(k) for k in SPLIT_KEYS} != want:
        raise ConfigError(f"--distil-from {teacher.path}: trained on another split (data, seed, balance or "
                          "fractions differ); train the student with the teacher's")
    return teacher


def teacher_split(teacher: Bundle) -> dict:
    """The teacher's training-data description; an ensemble's is its members' (same split, checked
    when it was built), read from the member bundles beside it (MODELS/<m> or MODELS/.work/recipe-members)."""
    if teacher.metadata.training is not None:
        return teacher.metadata.training.data.model_dump()
    models = teacher.path.parent.parent
    for m in teacher.metadata.architecture.members or []:
        p = member_dir(models, m.name, m.version)
        if p is not None and (t := load_bundle(p).metadata.training) is not None:
            return t.data.model_dump()
    raise ConfigError(f"--distil-from {teacher.path}: its training split is unknown (no training record, "
                      "and no member bundle beside it)")


def teacher_record(cfg) -> dict | None:
    """metadata.json's `distilled_from` (bundle.schema.Distillation) for a distilled run, else None."""
    if not cfg.distil_from:
        return None
    t = load_bundle(cfg.distil_from)
    acc = t.metadata.test_metrics.accuracy if t.metadata.test_metrics else None
    return {"name": t.name, "version": t.version, "architecture": t.metadata.architecture.name,
            "members": [m.architecture.name for m in t.metadata.architecture.members or []],
            "temperature": cfg.distil_temperature, "soft_weight": cfg.distil_weight, "teacher_test_accuracy": acc}


def teacher_targets(cfg, prepared, cache_dir: Path) -> list[torch.Tensor]:
    """The teacher's probabilities (as its bundle answers: temperature-scaled, members averaged) on
    each of the student's `finetune_views` views of the training images: one N x C tensor per view."""
    from covid_cxr.core.progress import step

    teacher = open_teacher(cfg.distil_from, prepared)
    with step(f"teacher {teacher.name} v{teacher.version}: soft labels"):
        cached = cached_teacher(teacher, cfg, prepared, cache_dir)
        return cached if cached is not None else onnx_teacher(teacher, cfg, prepared)


def teacher_parts(teacher: Bundle) -> list[tuple[torch.nn.Module, str, float, bool]]:
    """(classifier in torch, architecture, temperature, fine-tuned by stages?) per model the teacher
    averages (itself when it is no ensemble)."""
    from covid_cxr.models.loading import load_torch
    from covid_cxr.train.finetune import staged_supported

    arch, model = teacher.metadata.architecture, load_torch(teacher)
    if not arch.members:
        return [(model, arch.name, teacher.temperature, staged_supported(arch.name) and not arch.frozen_backbone)]
    return [(m, e.architecture.name, t, staged_supported(e.architecture.name) and not e.architecture.frozen_backbone)
            for m, e, t in zip(model.members, arch.members, model.temperatures)]


def cached_teacher(teacher: Bundle, cfg, prepared, cache_dir: Path) -> list[torch.Tensor] | None:
    """Soft labels from each model's fine-tuned top on its cached trunk activations of every view;
    None when some model of the teacher was not fine-tuned by stages (then: onnx_teacher)."""
    from covid_cxr.train.finetune import Top, first_trainable_block, trunk_views

    parts = teacher_parts(teacher)
    if not all(staged for *_, staged in parts):
        return None
    total = None
    for model, arch, temperature, _ in parts:
        k = first_trainable_block(arch)
        member_cfg = cfg.model_copy(update={"arch": arch, "image_size": teacher.input_hw[0],
                                            "finetune_from_block": None})  # the member's split (k), not the student's
        acts, _ = trunk_views(trunk_source(model, arch, k, len(prepared.classes)), prepared, member_cfg, cache_dir)
        top = Top(model, k).eval()
        with torch.inference_mode():
            probs = [torch.cat([torch.softmax(top(a.float()) / temperature, 1) for a in view.split(64)])
                     for view in acts["train"][0]]
        total = probs if total is None else [a + b for a, b in zip(total, probs)]
    return [p / len(parts) for p in total]


def trunk_state(model, k: int) -> list[torch.Tensor]:
    b = model.backbone
    mods = [b.conv_stem, b.bn1, *b.blocks[:k]]
    return [t for m in mods for _, t in sorted(m.state_dict().items())]


def trunk_source(model, arch: str, k: int, n_classes: int):
    """What keys the trunk's cache: the ImageNet classifier the teacher's training cached its views
    with, when its frozen trunk is that one (so its cache is found), else the teacher's own model
    (right, but its trunk runs again)."""
    from covid_cxr.models import create_model

    try:
        fresh, _ = create_model(arch, "imagenet", n_classes, mean=float(model.mean), std=float(model.std))
    except Exception:  # no ImageNet weights here: the teacher's own trunk, uncached
        return model
    same = all(torch.equal(a, b) for a, b in zip(trunk_state(fresh, k), trunk_state(model, k)))
    return fresh if same else model


def onnx_teacher(teacher: Bundle, cfg, prepared) -> list[torch.Tensor]:
    """Soft labels from the teacher's model.onnx on the student's views, augmented at its input size."""
    from covid_cxr.core.progress import progress_iter
    from covid_cxr.data.decode import load_batch
    from covid_cxr.train.finetune import augment_each, view_seeds

    items = [(prepared.manifest.root / r.path, r.sha256) for r in prepared.splits["train"]]
    chunks = [items[i:i + 32] for i in range(0, len(items), 32)]
    h, w = teacher.input_hw
    out = []
    for v in range(cfg.finetune_views):
        probs = []
        for chunk in progress_iter(chunks, f"teacher, view {v}", enabled=cfg.progress):
            x = torch.from_numpy(load_batch([p for p, _ in chunk], h, w))[:, None]
            x = augment_each(x, view_seeds(chunk, v)) if v else x
            probs.append(teacher.predict(x[:, 0].numpy()))
        out.append(torch.from_numpy(np.concatenate(probs)).float())
    return out


def check_student(cfg, prepared) -> None:
    """Refuse a distillation that could not run, before minutes of feature extraction: the student
    learns by staged fine-tuning, and the teacher must fit the data (open_teacher)."""
    from covid_cxr.train.finetune import staged_supported

    if not cfg.distil_from:
        return
    if not (cfg.finetune and cfg.cache_features and staged_supported(cfg.arch)):
        raise ConfigError(f"--distil-from: the student learns by staged fine-tuning (--finetune on "
                          f"EfficientNet-Lite with the feature cache), not {cfg.arch}")
    open_teacher(cfg.distil_from, prepared)
