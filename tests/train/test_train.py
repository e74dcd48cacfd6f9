"""Training, bundle and evaluation on real X-rays: ONNX parity, resume, atomic bundles, the CLI
end to end (every architecture), evaluation on another layout, comparison, prediction."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from covid_cxr.bundle import load_bundle, versions
from covid_cxr.cli import app
from covid_cxr.data.decode import load_for_model
from covid_cxr.train.fit import TrainConfig, train
from covid_cxr.models.loading import load_torch
from tests.conftest import sample_images

runner = CliRunner()


def _invoke(*args: str):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, f"exit {res.exit_code}: {res.output}\n{res.exception!r}"
    return res


def test_bundle_is_complete_and_onnx_matches_pytorch(bundle_dir, data_dir):
    b = load_bundle(bundle_dir)
    meta = b.metadata
    assert meta.format_version == 2 and meta.software and meta.created
    assert meta.classes == ["COVID-19", "Normal", "Viral Pneumonia"]
    assert meta.input.normalisation.computed_on == "train split"
    assert meta.training.data.counts["test"] and meta.training.data.manifest_sha256
    assert 1e-6 < meta.training.history.lr_range_test_suggestion < 1
    timings = meta.training.timings_s
    assert timings["bundle"] > 0 and timings["total"] >= sum(v for k, v in timings.items() if k != "total")
    for f in ("model.safetensors", "model.onnx", "metadata.json", "report/metrics.json",
              "report/confusion_matrix.png", "report/curves.png", "report/lr_find.png"):
        assert (b.path / f).is_file(), f
    h, w = b.input_hw
    paths = [p for ps in sample_images(data_dir, 6).values() for p in ps]
    x = np.stack([load_for_model(p, h, w) for p in paths])
    onnx_p = b.predict(x)
    import torch

    with torch.no_grad():  # model.onnx divides the logits by the calibration temperature
        torch_p = torch.softmax(load_torch(b)(torch.from_numpy(x)[:, None]) / b.temperature, 1).numpy()
    diff = float(np.abs(onnx_p - torch_p).max())
    print(f"ONNX vs PyTorch max |dp| on {len(x)} real X-rays: {diff:.2e}")
    assert diff < 1e-4
    assert (onnx_p.argmax(1) == torch_p.argmax(1)).all()
    # the head learned something real from 40 images per class (chance is 0.33; n = 18)
    assert meta.test_metrics.accuracy >= 0.6


def test_resume_continues_from_the_last_checkpoint(data_dir, tmp_path):
    cfg = TrainConfig(arch="efficientnet_lite0", epochs=2, patience=50, max_per_class=20, progress=False)
    first = train(data_dir, tmp_path / "models", cfg, workdir=tmp_path / "work")
    assert len(first.history) == 2
    run_dir = tmp_path / "work" / cfg.run_id()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    cfg.epochs = 4
    resumed = train(data_dir, tmp_path / "models", cfg, workdir=tmp_path / "work", resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]  # epochs 1-2 came from the checkpoint
    assert resumed.history[:2] == first.history
    assert versions(tmp_path / "models" / "efficientnet_lite0") == [1, 2]
    # without --resume, the same config starts over
    fresh = train(data_dir, tmp_path / "models", cfg, workdir=tmp_path / "work")
    assert [h["epoch"] for h in fresh.history] == [1, 2, 3, 4]


def _subset(data_dir: Path, root: Path, n: int, layout: str = "release2") -> Path:
    """A real subset in one of the database's layouts."""
    for folder, ps in sample_images(data_dir, n).items():
        name = {"COVID": "COVID-19", "Normal": "NORMAL"}.get(folder, folder) if layout == "release1" else folder
        d = root / name / ("images" if layout == "release2" else "")
        d.mkdir(parents=True, exist_ok=True)
        for i, p in enumerate(ps, 1):
            shutil.copy(p, d / (f"{name} ({i}).png" if layout == "release1" else p.name))
    return root


def test_cli_run_evaluate_compare_predict_end_to_end(data_dir, tmp_path):
    data = _subset(data_dir, tmp_path / "train-data", 30)
    out = tmp_path / "run"
    res = _invoke("run", "--data", data, "--out", out, "--archs", "efficientnet_lite0", "--epochs", "6",
                  "--max-per-class", "30")
    assert "report:" in res.output
    summary = (out / "report" / "summary.md").read_text()
    assert "| Category | Model | Precision | Recall | F1 | Accuracy |" in summary
    assert (out / "report" / "comparison.csv").is_file() and (out / "splits.csv").is_file()
    model = out / "models" / "efficientnet_lite0"

    # evaluate on other real images, stored in the first release's layout
    other = _subset(data_dir, tmp_path / "hospital", 45, layout="release1")
    for folder in ("COVID-19", "NORMAL", "Viral Pneumonia"):  # only images the model never saw
        for p in sorted((other / folder).iterdir())[:30]:
            p.unlink()
    (other / "NORMAL" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    _invoke("evaluate", "--model", model, "--data", other, "--json", tmp_path / "m.json", "--out", tmp_path / "ev")
    m = json.loads((tmp_path / "m.json").read_text())
    assert set(m["per_class"]) == {"COVID-19", "Normal", "Viral Pneumonia"}
    assert sum(e["support"] for e in m["per_class"].values()) == 45
    assert 0 <= m["accuracy"] <= 1 and set(m["per_class"]["COVID-19"]) == {"precision", "recall", "f1", "support", "ci"}
    assert m["per_class"]["COVID-19"]["ci"]["recall"][0] <= m["per_class"]["COVID-19"]["recall"]
    assert (tmp_path / "ev" / "confusion_matrix.png").is_file()

    res = _invoke("compare", out / "models", "--out", tmp_path / "cmp")
    assert "efficientnet_lite0 v1" in (tmp_path / "cmp" / "comparison.md").read_text()

    img = sample_images(data_dir, 1)["COVID"][0]
    res = _invoke("predict", img, "--model", model, "--json", tmp_path / "pred.json")
    pred = json.loads((tmp_path / "pred.json").read_text())
    assert pred["results"][0]["in_distribution"] is True  # a real X-ray passes the gate ...
    assert pred["results"][0]["label"] in ("COVID-19", "Normal", "Viral Pneumonia")  # ... and gets a label
    assert abs(sum(pred["results"][0]["probabilities"].values()) - 1) < 1e-4


@pytest.mark.parametrize("arch", ["vgg16", "resnet50", "densenet121"])
def test_study_architectures_train_end_to_end_without_pretrained_weights(data_dir, tmp_path, arch):
    data = _subset(data_dir, tmp_path / "d", 12)
    res = _invoke("train", "--data", data, "--out", tmp_path / "m", "--arch", arch, "--weights", "none",
                  "--epochs", "2", "--image-size", "64", "--max-per-class", "12")
    assert "bundle:" in res.output
    b = load_bundle(tmp_path / "m" / arch)
    assert b.metadata.architecture.weights.startswith("none") and b.input_hw == (64, 64)
    assert b.metadata.onnx.parity_max_abs_diff < 1e-4
    failed = runner.invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "m"), "--arch", arch])
    assert failed.exit_code == 2 and "--weights none" in failed.output


def test_lr_find_saves_its_plot(data_dir, tmp_path):
    data = _subset(data_dir, tmp_path / "d", 20)
    res = _invoke("lr-find", "--data", data, "--out", tmp_path / "lr.png", "--workdir", tmp_path / "w",
                  "--steps", "30")
    assert "suggested learning rate" in res.output
    assert (tmp_path / "lr.png").stat().st_size > 10_000


def test_data_inspect_reports_counts_and_duplicates(data_dir, tmp_path):
    data = _subset(data_dir, tmp_path / "d", 5)
    src = next((data / "COVID" / "images").iterdir())
    shutil.copy(src, src.with_name("again.png"))
    (data / "Normal" / "images" / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    res = _invoke("data", "inspect", data, "--json", tmp_path / "inspect.json")
    info = json.loads((tmp_path / "inspect.json").read_text())
    assert info["counts"]["COVID-19"] == {"ok": 5, "skipped": 0, "duplicate": 1}
    assert info["counts"]["Normal"]["skipped"] == 1
    assert info["skipped"][0]["path"].endswith("bad.jpg") and info["skipped"][0]["reason"]


@pytest.mark.parametrize("from_block, trained, kept", [(None, {"blocks.6", "conv_head", "bn2"}, "blocks.5"),
                                                        (5, {"blocks.5", "blocks.6", "conv_head", "bn2"}, "blocks.4")])
def test_finetune_unfreezes_only_the_last_stages(data_dir, tmp_path, from_block, trained, kept):
    from covid_cxr.models import create_model
    from covid_cxr.train.finetune import trainable_modules

    cfg = TrainConfig(arch="efficientnet_lite0", epochs=1, max_per_class=10, image_size=96, finetune=True,
                      finetune_from_block=from_block, progress=False)
    model, _ = create_model("efficientnet_lite0", weights="imagenet")
    model.freeze_backbone(trainable=trainable_modules(cfg))
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks") else "")
                 for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable == trained
    data = _subset(data_dir, tmp_path / "d", 10)
    r = train(data, tmp_path / "m", cfg, workdir=tmp_path / "w")
    b = load_bundle(r.bundle_path)
    assert b.metadata.architecture.frozen_backbone is False
    assert b.metadata.training.feature_cache is True  # staged: head on cached features, then the last stages
    assert [h.get("stage") for h in r.history][-1] == 2
    before, _ = create_model("efficientnet_lite0", weights="imagenet")
    after = load_torch(b)
    first = lambda m, name: next(iter(m.backbone.get_submodule(name).state_dict().values())).numpy()  # noqa: E731
    changed = lambda name: not np.allclose(first(before, name), first(after, name))  # noqa: E731
    assert all(changed(m) for m in trained) and not changed(kept) and not changed("conv_stem")


def test_splits_csv_round_trips_odd_paths(tmp_path):
    import csv
    from types import SimpleNamespace

    from covid_cxr.pipeline import write_splits

    rec = SimpleNamespace(path='COVID/a, "b".png', label="COVID-19", sha256="ab", group=3)
    prepared = SimpleNamespace(splits={"train": [rec], "val": [], "test": []})
    write_splits(prepared, tmp_path / "s.csv")
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert rows == [{"path": 'COVID/a, "b".png', "label": "COVID-19", "split": "train", "sha256": "ab", "group": "3"}]
