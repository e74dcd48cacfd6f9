"""Issue 9 on the tiny bundles: the operating point (fit on validation, stored, used by predict,
evaluate and serve), several datasets in one manifest (source kept, splits by class and source),
and ensembles (one bundle averaging its members, explained by Grad-CAM)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from covid_cxr.bundle import load_bundle
from covid_cxr.core.errors import ConfigError
from covid_cxr.evaluate.operating_point import choose, decide, fit_threshold, parse_target
from tests.unit.builds import built_once, train_tiny


# ----------------------------------------------------------------------------- operating point

def test_threshold_reaches_the_target_recall_and_only_adds_predictions_of_the_class():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    p = rng.dirichlet([1, 1, 1], 300)
    p[y == 0, 0] += rng.random((y == 0).sum())  # class 0 is ranked higher, imperfectly
    p /= p.sum(1, keepdims=True)
    for target in (0.5, 0.9, 0.97, 1.0):
        t = fit_threshold(y, p, 0, target)
        pred = decide(p, 0, t)
        assert (pred[y == 0] == 0).mean() >= target
        assert set(np.flatnonzero(p.argmax(1) == 0)) <= set(np.flatnonzero(pred == 0))  # never removes
    op = choose(y, p, ["COVID-19", "Normal", "Viral Pneumonia"], "COVID-19=0.97")
    assert op.val_recall >= 0.97 and op.class_name == "COVID-19"


@pytest.mark.parametrize("bad", ["COVID-19", "COVID-19=1.5", "=0.9", "COVID-19=0"])
def test_target_recall_must_read_class_equals_recall(bad):
    with pytest.raises(ConfigError):
        parse_target(bad)


@pytest.fixture(scope="module")
def op_models(tmp_path_factory, worker_id):
    """A second tiny bundle on the same split as `tiny` (other head), with an operating point."""
    def build(folder, scratch):
        train_tiny(folder, scratch, name="op", hidden=[32], target_recall="COVID-19=1.0")

    return built_once(tmp_path_factory, worker_id, "op-models", build)


def test_the_operating_point_is_stored_reported_and_used(op_models, tiny_data, tmp_path):
    from typer.testing import CliRunner

    from covid_cxr.cli import app

    b = load_bundle(op_models / "op")
    op = b.metadata.operating_point
    assert op.class_name == "COVID-19" and op.val_recall == 1.0 and 0 <= op.threshold <= 1
    m = b.metadata.test_metrics.operating_point.metrics
    assert m.per_class["COVID-19"].recall >= b.metadata.test_metrics.per_class["COVID-19"].recall
    md = (b.report_dir / "metrics.md").read_text()
    assert "## Argmax" in md and "## At the operating point: COVID-19 when p >=" in md
    probs = np.array([[op.threshold, 1 - op.threshold, 0.0], [0.0, 1.0, 0.0]])
    assert b.decide(probs).tolist() == [0, 1]  # at the threshold: COVID-19 even when not the argmax
    image = sorted((tiny_data / "Normal").glob("*.png"))[0]
    res = CliRunner().invoke(app, ["predict", str(image), "--model", str(op_models / "op"), "--json",
                                   str(tmp_path / "pred.json")])
    got = json.loads((tmp_path / "pred.json").read_text())["results"][0]
    want = b.classes[int(b.decide(np.array([list(got["probabilities"].values())]))[0])]
    assert res.exit_code == 0 and got["label"] == (None if got["in_distribution"] is False else want)
    res = CliRunner().invoke(app, ["evaluate", "--model", str(op_models / "op"), "--data", str(tiny_data),
                                   "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["operating_point"]["class_name"] == "COVID-19"


def test_the_server_labels_by_the_operating_point(op_models, tiny_data, tmp_path):
    """With the threshold at 0 every accepted image is COVID-19; an image the gate rejects gets no
    label at all (its probabilities stay in the answer)."""
    import requests

    from covid_cxr.serve.settings import ServeSettings
    from covid_cxr.serve.testing import running_server
    from tests.unit.images import _encode
    from PIL import Image

    models = tmp_path / "models"
    shutil.copytree(op_models / "op" / "1", models / "op" / "1")
    meta = json.loads((models / "op" / "1" / "metadata.json").read_text())
    meta["operating_point"]["threshold"] = 0.0  # every image reaches it: always COVID-19
    (models / "op" / "1" / "metadata.json").write_text(json.dumps(meta))
    xray = sorted((tiny_data / "Normal").glob("*.png"))[0]
    gray = _encode(Image.new("L", (80, 80), 90), "PNG")
    with running_server(ServeSettings(models=models)) as url:
        accepted = requests.post(f"{url}/api/v1/predict", files={"file": ("x.png", xray.read_bytes(), "image/png")},
                                 timeout=30).json()
        flat = requests.post(f"{url}/api/v1/predict", files={"file": ("g.png", gray, "image/png")}, timeout=30).json()
    assert accepted["in_distribution"] is True and accepted["label"] == "COVID-19"
    assert flat["in_distribution"] is False and "label" not in flat and len(flat["probabilities"]) == 3


# ----------------------------------------------------------------------------- several datasets

def test_several_folders_make_one_manifest_split_by_class_and_source(tmp_path):
    from covid_cxr.data import prepare
    from covid_cxr.data.synthetic import make_synthetic_dataset

    a = make_synthetic_dataset(tmp_path / "siteA", per_class=10, size=48, seed=1)
    b = make_synthetic_dataset(tmp_path / "siteB" / "x-rays", per_class=10, size=48, seed=2)
    shutil.copy(a / "Normal" / "Normal-0.png", b / "Normal" / "copy-of-A.png")  # the same film twice
    p = prepare([a, b], balance="none", seed=0, progress=False)
    recs = p.manifest.records
    assert {r.source for r in recs} == {"siteA", "x-rays"}
    assert all((p.manifest.root / r.path).is_file() for r in recs)
    assert p.manifest.dedupe["exact_duplicates"] == 1
    for split, rs in p.splits.items():
        for src in ("siteA", "x-rays"):
            for c in p.classes:
                assert any(r.source == src and r.label == c for r in rs), (split, src, c)
    assert set(p.describe()["sources"]) == {"siteA", "x-rays"}


# ----------------------------------------------------------------------------- ensembles

@pytest.mark.slow  # in `make test`, not in `make test-fast`
def test_an_ensemble_bundle_averages_its_members_and_is_explained(tiny_models, op_models, tmp_path):
    from covid_cxr.publish.ensemble import build_ensemble
    from covid_cxr.explain.gradcam import explainer_for_bundle

    members = [tiny_models / "tiny", op_models / "op"]
    ens = build_ensemble(members, tmp_path / "models", "ens")
    again = load_bundle(tmp_path / "models" / "ens")
    assert again.metadata.architecture.name == "ensemble" and len(again.metadata.architecture.members) == 2
    assert again.metadata.test_metrics.n == load_bundle(members[0]).metadata.test_metrics.n
    from covid_cxr.site.check import adapt_target

    start, note = adapt_target(again)  # site check's next step: an ensemble is adapted through one model
    assert start == "MODELS/tiny" and "ensemble" in note  # its members are not beside it here
    ref = again.metadata.site_reference  # the ensemble's own answers on the shared validation split
    assert ref is not None and ref.n == sum(load_bundle(members[0]).metadata.training.data.counts["val"].values())
    assert len(ref.ood_score) == ref.n and ref.images is not None
    x = np.random.default_rng(0).random((3, 64, 64), dtype=np.float32)
    want = np.mean([load_bundle(m).predict(x) for m in members], axis=0)
    assert np.abs(ens.predict(x) - want).max() < 1e-5
    cam = explainer_for_bundle(again).explain(x[0])[0]
    assert cam.cam.shape == (64, 64) and np.isfinite(cam.cam).all()
    assert again.has_cam and again.metadata.cam.parity_max_abs_diff <= 1e-3  # the members' maps, in the graph
    assert "log of the members' averaged" in again.metadata.cam.target
    graph = again.cam_maps(x[:1])[0, cam.class_index]
    assert np.abs(graph - cam.cam).max() <= 1e-3  # cam.onnx = pytorch-grad-cam on the ensemble's output
    # its gate: the members' scores, each over its member's threshold, averaged; threshold from val
    from covid_cxr.trust.ood import EnsembleOOD, gate_from_arrays

    gate = gate_from_arrays(again.trust_arrays())
    assert again.has_ood and isinstance(gate, EnsembleOOD) and len(gate.members) == 2
    assert again.metadata.trust.ood.method == "mahalanobis-stages-ensemble"
    _, score, inside = again.predict_with_ood(x)
    want = gate.combine([load_bundle(m).predict_with_ood(x)[1] for m in members])
    assert np.allclose(score, want, rtol=1e-4)
    assert (inside == (score <= gate.threshold)).all()
    assert 0 < again.metadata.trust.ood.val_accept_rate <= 1 and again.metadata.test_metrics.ood_rate is not None


def test_an_ensemble_refuses_members_with_other_inputs(tiny_models, tmp_path):
    from covid_cxr.publish.ensemble import build_ensemble
    from covid_cxr.bundle.reader import BundleError

    other = tmp_path / "m" / "big" / "1"
    shutil.copytree(tiny_models / "tiny" / "1", other)
    meta = json.loads((other / "metadata.json").read_text())
    meta["input"]["height"] = meta["input"]["width"] = 96
    meta["onnx"]["inputs"][0]["shape"] = [-1, 96, 96, 1]
    meta["cam"] = None  # its cam.onnx is for 64 px; the point here is the input size
    (other / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="input"):
        build_ensemble([tiny_models / "tiny", other], tmp_path / "out", "ens")


# ----------------------------------------------------------------------------- fine-tuning, site adaptation

@pytest.mark.slow  # in `make test`, not in `make test-fast`
def test_staged_finetune_from_a_bundle_changes_only_the_last_stages(tiny_models, tiny_data, tmp_path):
    """--init-from a bundle + staged --finetune: the bundle's architecture and normalisation are
    kept, blocks.6 and the head move, the stem does not, and the report says before vs after."""
    from safetensors.torch import load_file

    from covid_cxr.train.fit import TrainConfig, train

    base = load_bundle(tiny_models / "tiny")
    cfg = TrainConfig(init_from=str(tiny_models / "tiny"), finetune=True, finetune_views=2, finetune_epochs=2,
                      epochs=1, lr=0.01, lr_find=False, progress=False, name="site")
    r = train(tiny_data, tmp_path / "models", cfg, workdir=tmp_path / "work")
    b = load_bundle(r.bundle_path)
    assert b.input_hw == base.input_hw and b.metadata.input.normalisation == base.metadata.input.normalisation
    assert not b.metadata.architecture.frozen_backbone and "bundle tiny v1" in b.metadata.architecture.weights
    old, new = load_file(str(base.path / "model.safetensors")), load_file(str(b.path / "model.safetensors"))
    assert (old["backbone.conv_stem.weight"] == new["backbone.conv_stem.weight"]).all()
    changed = [k for k in old if k.startswith("backbone.blocks.6.") and not (old[k] == new[k]).all()]
    assert changed and any(k.startswith("backbone.conv_head") and not (old[k] == new[k]).all() for k in old)
    assert [h.get("stage") for h in r.history] == [None, 2, 2]
    assert r.metrics.before_adaptation.n == r.metrics.n
    assert "Site adaptation: before" in (b.report_dir / "metrics.md").read_text()
    assert list((tmp_path / "work" / "feature-cache" / "backbones").glob("*-trunk6-stats*.onnx"))


def test_recipes_apply_their_settings_and_explicit_options_win():
    from covid_cxr.core.config import TrainConfig
    from covid_cxr.train.recipes import recipe_configs

    [study] = recipe_configs("study", TrainConfig())
    assert study.balance == "undersample" and study.max_per_class == 219 and study.name == "study"
    members = recipe_configs("accurate", TrainConfig(seed=3, name="mine"))  # an ensemble: one split for all
    assert [m.arch for m in members] == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert all(m.finetune and m.seed == 3 and m.target_recall == "COVID-19=0.97" for m in members)
    assert len({m.name for m in members}) == 3
    with pytest.raises(ConfigError, match="unknown recipe"):
        recipe_configs("fastest", TrainConfig())


def test_an_ensemble_recipe_gives_its_operating_point_to_the_ensemble(monkeypatch, tmp_path):
    """The ensemble bundle is what a user serves: it must carry the recipe's operating point even
    when the command line gave none (a fault found in the first full --recipe accurate run)."""
    from types import SimpleNamespace

    import covid_cxr.publish.ensemble as ensemble
    import covid_cxr.train.fit as fit
    from covid_cxr.core.config import TrainConfig
    from covid_cxr.train.recipes import train_recipe

    trained, built = [], {}
    monkeypatch.setattr(fit, "train", lambda data, out, c, **kw: trained.append(c) or
                        SimpleNamespace(bundle_path=tmp_path / c.name, metrics=None))
    monkeypatch.setattr(ensemble, "build_ensemble", lambda paths, out, name, target_recall=None, **rule: built.update(
        paths=paths, name=name, target_recall=target_recall, **rule) or SimpleNamespace(
        path=tmp_path / name, name=name, version=1,
        metadata=SimpleNamespace(test_metrics=None)))
    train_recipe("accurate", tmp_path / "data", tmp_path / "models", TrainConfig(epochs=5, arch="efficientnet_lite2"))
    assert len(trained) == 4 and len(built["paths"]) == 3 and built["name"] == "accurate-teacher"
    assert (built["target_recall"], built["confidence"], built["batch"]) == ("COVID-19=0.97", 0.9, 200)
    # the recipe's bundle is the student distilled from that ensemble, at the student's own settings
    student = trained[-1]
    assert student.name == "accurate" and student.distil_from == str(tmp_path / "accurate-teacher")
    assert (student.arch, student.size, student.finetune) == ("efficientnet_lite0", 224, True)
    assert student.target_recall == "COVID-19=0.97" and student.epochs == 5  # common settings and options kept
    assert [c.distil_from for c in trained[:3]] == [None] * 3


def test_site_adaptation_never_tests_on_images_the_bundle_trained_on(tiny_models, tiny_data):
    """Another seed re-splits the same images: test images the bundle trained on move to train."""
    from covid_cxr.data import prepare
    from covid_cxr.train.adapt import exclude_seen, trained_on
    from covid_cxr.core.config import TrainConfig

    cfg = TrainConfig(init_from=str(tiny_models / "tiny"), seed=7)
    seen = trained_on(load_bundle(tiny_models / "tiny"))
    p = prepare(tiny_data, seed=7, progress=False)
    assert any(r.sha256 in seen for r in p.splits["test"])  # the leak this guards against
    n = sum(len(v) for v in p.splits.values())
    moved = exclude_seen(p, cfg)
    assert moved > 0 and not any(r.sha256 in seen for r in p.splits["test"])
    assert sum(len(v) for v in p.splits.values()) == n
