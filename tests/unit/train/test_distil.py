"""Distillation (train/distil.py): a tiny staged teacher at 64 px distilled into a tiny student;
its soft labels from cached trunk activations equal the teacher's own answers; bad teachers refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from covid_cxr.bundle import load_bundle
from covid_cxr.core.config import TrainConfig
from covid_cxr.core.errors import ConfigError
from covid_cxr.data.decode import load_batch

STAGED = dict(image_size=64, epochs=2, finetune=True, finetune_views=2, finetune_epochs=1, lr_find=False,
              progress=False)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_data):
    """MODELS/teacher/1: lite0 (ImageNet weights from the installed package) fine-tuned by stages."""
    from covid_cxr.train.fit import train

    root = tmp_path_factory.mktemp("distil")
    r = train(tiny_data, root / "models", TrainConfig(**STAGED, name="teacher"), workdir=root / "work")
    return r.bundle_path, root


def test_distil_loss_is_zero_at_the_teacher_and_positive_elsewhere():
    from covid_cxr.train.distil import distil_loss

    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    for t in (1.0, 2.0, 4.0):
        assert distil_loss(torch.log(p) + 3.0, p, t).abs() < 1e-6  # logits up to a constant
        assert distil_loss(torch.zeros(2, 3), p, t) > 0.01
    logits = torch.zeros(2, 3, requires_grad=True)
    distil_loss(logits, p, 2.0).backward()
    assert (logits.grad.argmin(1) == p.argmax(1)).all()  # descending moves toward the teacher's class


def test_distil_from_needs_staged_finetuning():
    from covid_cxr.train.distil import check_student

    for cfg in (TrainConfig(distil_from="MODELS/teacher"), TrainConfig(distil_from="T", finetune=True, arch="vgg16")):
        with pytest.raises(ConfigError, match="staged fine-tuning"):
            check_student(cfg, None)  # refused before the data or the teacher are looked at
    check_student(TrainConfig(finetune=True), None)  # no teacher: nothing to check
    # without a teacher the run id is what it was before distillation existed (resume keeps working)
    assert TrainConfig(distil_weight=0.5).run_id() == TrainConfig().run_id()
    assert TrainConfig(distil_from="T", finetune=True).run_id() != TrainConfig(finetune=True).run_id()


def test_the_recipe_distils_from_a_given_teacher_without_retraining_it(monkeypatch, tmp_path):
    """`--recipe accurate --distil-from T`: the student alone, from T, at the recipe's settings."""
    from types import SimpleNamespace

    import covid_cxr.publish.ensemble as ensemble
    import covid_cxr.train.fit as fit
    from covid_cxr.train.recipes import recipe_configs, train_recipe

    trained = []
    monkeypatch.setattr(fit, "train", lambda data, out, c, **kw: trained.append(c) or
                        SimpleNamespace(bundle_path=tmp_path / c.name, metrics={}))
    monkeypatch.setattr(ensemble, "build_ensemble", lambda *a, **k: pytest.fail("the teacher was rebuilt"))
    base = TrainConfig(distil_from="MODELS/accurate-teacher/1", distil_weight=0.5)
    path, _ = train_recipe("accurate", tmp_path / "data", tmp_path / "models", base)
    (student,) = trained
    assert path == tmp_path / "accurate" and student.distil_from == "MODELS/accurate-teacher/1"
    assert (student.arch, student.size, student.finetune, student.distil_weight) == ("efficientnet_lite0", 224, True, 0.5)
    assert (student.target_recall, student.target_batch) == ("COVID-19=0.97", 200) and not student.lr_find
    assert all(m.distil_from is None for m in recipe_configs("accurate", base))  # members learn from labels
    assert student.finetune_from_block == 4 and {m.finetune_from_block for m in recipe_configs("accurate", base)} == {None}


@pytest.mark.slow  # needs the staged fine-tuned teacher
@pytest.mark.parametrize("student_from_block", [None, 5])
def test_cached_soft_labels_are_the_teachers_answers_on_the_same_views(teacher, tiny_data, student_from_block):
    """From the teacher's cached trunk (found, not recomputed) = its model.onnx on the augmented images,
    whatever depth the student fine-tunes from (the teacher's members keep their own split)."""
    from covid_cxr.data import prepare
    from covid_cxr.train.distil import cached_teacher, onnx_teacher

    path, root = teacher
    cache = root / "work" / "feature-cache"
    before = sorted(p.name for p in cache.rglob("*"))
    cfg = TrainConfig(**STAGED, distil_from=str(path), finetune_from_block=student_from_block)
    prepared = prepare(tiny_data, None, "undersample", None, 0, progress=False)
    b = load_bundle(path)
    cached, direct = cached_teacher(b, cfg, prepared, cache), onnx_teacher(b, cfg, prepared)
    assert sorted(p.name for p in cache.rglob("*")) == before  # the teacher's own cache served it
    assert len(cached) == len(direct) == 2 and cached[0].shape == (len(prepared.splits["train"]), 3)
    np.testing.assert_allclose(cached[0], direct[0], atol=1e-4)
    np.testing.assert_allclose(cached[1], direct[1], atol=2e-2)  # augmented views are cached in fp16
    assert (cached[1].argmax(1) == direct[1].argmax(1)).float().mean() > 0.9
    assert not torch.allclose(direct[0], direct[1], atol=1e-3)  # view 1 is another image


@pytest.mark.slow
def test_student_learns_the_teacher_and_names_it(teacher, tiny_data):
    from covid_cxr.data import prepare
    from covid_cxr.train.fit import train

    path, root = teacher
    cfg = TrainConfig(**{**STAGED, "finetune_epochs": 24}, lr=1e-2, distil_from=str(path), distil_weight=1.0,
                      name="student")
    student = load_bundle(train(tiny_data, root / "models", cfg, workdir=root / "work").bundle_path)
    t = load_bundle(path)
    d = student.metadata.distilled_from
    assert (d.name, d.version, d.architecture, d.soft_weight) == ("teacher", t.version, "efficientnet_lite0", 1.0)
    assert load_bundle(path).metadata.distilled_from is None
    prepared = prepare(tiny_data, None, "undersample", None, 0, progress=False)
    x = load_batch([prepared.manifest.root / r.path for r in prepared.splits["train"]], 64, 64)
    want, got = t.predict(x).argmax(1), student.predict(x).argmax(1)
    assert len(set(want)) > 1  # the teacher is no constant, so agreement means something
    constant = np.bincount(want).max() / len(want)  # what a student answering one class would reach
    assert (want == got).mean() >= max(0.9, constant + 0.1), ((want == got).mean(), constant)  # measured 0.958


@pytest.mark.slow  # needs the staged fine-tuned teacher
def test_a_teacher_that_does_not_fit_the_data_is_refused(teacher, tiny_data, tmp_path):
    from covid_cxr.train.fit import train

    path, _ = teacher
    bad = {"classes": (["COVID-19", "Normal"], "classes"), "seed": (1, "another split"),
           "arch": ("vgg16", "staged fine-tuning")}
    for field, (value, message) in bad.items():
        cfg = TrainConfig(**{**STAGED, "weights": "none", field: value}, distil_from=str(path), name="student")
        with pytest.raises(ConfigError, match=message):
            train(tiny_data, tmp_path / "models", cfg, workdir=tmp_path / "work")
    assert not (tmp_path / "models" / "student").exists()
