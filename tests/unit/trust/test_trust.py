"""Trust on the tiny bundle: OOD outputs inside model.onnx agree with numpy, temperature lowers NLL,
bootstrap intervals, the with_ood signature over TF Serving REST (serving_default unchanged),
predict --json fields, bundles without the gate, and the audit catching a planted marker."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import requests
from typer.testing import CliRunner

from covid_cxr.bundle import load_bundle
from covid_cxr.cli import app
from covid_cxr.data.decode import load_batch
from covid_cxr.serve.protocol import signature_def
from covid_cxr.serve.settings import ServeSettings
from covid_cxr.serve.testing import running_server
from covid_cxr.trust.bootstrap import bootstrap_ci
from covid_cxr.trust.calibration import ece, fit_temperature, nll, softmax
from covid_cxr.trust.ood import OODStats
from covid_cxr.models.loading import load_torch

runner = CliRunner()


def _images(tiny_data, n=6):
    paths = sorted(tiny_data.rglob("*.png"))[::6][:n]
    return paths, load_batch(paths, 64, 64)


def test_ood_outputs_in_onnx_match_numpy(tiny_models, tiny_data):
    import torch

    from covid_cxr.trust.stages import StageStats

    b = load_bundle(tiny_models / "tiny")
    assert b.has_ood and [t.name for t in b.metadata.onnx.outputs] == ["probabilities", "ood_score", "in_distribution"]
    _, real = _images(tiny_data)
    rng = np.random.default_rng(0)
    x = np.concatenate([real, rng.random((2, 64, 64), np.float32), np.zeros((1, 64, 64), np.float32)])
    probs, score, inside = b.predict_with_ood(x)
    arrays = b.trust_arrays()
    stats = OODStats.from_arrays(arrays)
    gate = b.metadata.trust.ood
    assert gate.method == "mahalanobis-stages" and len(stats.indices) >= 2  # pooled + intermediate stages
    assert [s.name for s in gate.stages] == ["pooled", "blocks.0", "blocks.1", "blocks.2", "blocks.4"]  # timm's stages
    np.testing.assert_allclose([s.scale for s in gate.stages], [s.scale for s in stats.stages])
    model = load_torch(b)
    with torch.no_grad():
        feats = StageStats(model, stats.indices)(torch.from_numpy(x)[:, None]).numpy()
        logits = model(torch.from_numpy(x)[:, None]).numpy()
    want = stats.score(feats)
    np.testing.assert_allclose(score, want, rtol=1e-3)
    assert (inside == (want <= stats.threshold)).all()
    np.testing.assert_allclose(probs, softmax(logits / arrays["temperature"][0]), atol=1e-5)
    assert gate.threshold == pytest.approx(stats.threshold)
    assert not inside[-3:].any(), "noise and a blank image must be out of distribution"


def test_inverted_and_blank_images_are_rejected(tiny_models, tiny_data):
    """What the pooled features alone missed on the real model (issue 8: 63 % of inverted X-rays,
    96 % of blank images rejected). On the tiny model (4 seeds tried) these score 27x-2,000x the
    threshold; the in-distribution images about 0.1x."""
    _, real = _images(tiny_data)
    blank = np.stack([np.full((64, 64), v, np.float32) for v in (0.0, 0.5, 1.0)])
    _, _, inside = load_bundle(tiny_models / "tiny").predict_with_ood(np.concatenate([1.0 - real, blank]))
    assert not inside.any()


@pytest.mark.slow  # every stage through ONNX Runtime and torch
def test_stage_statistics_by_onnxruntime_equal_torch_and_are_cached(tiny_models, tiny_data, tmp_path):
    """The gate is fitted on StageStats from ONNX Runtime (real data) or torch (few images): same
    numbers; a second fit reads them from the cache."""
    from covid_cxr.data import prepare
    from covid_cxr.trust.stages import stage_features

    b = load_bundle(tiny_models / "tiny")
    cfg = b.metadata.training.config.model_copy(update={"progress": False})
    prepared = prepare(tiny_data, cfg.classes, cfg.balance, cfg.max_per_class, cfg.seed, progress=False)
    model = load_torch(b)
    got = {e: stage_features(model, prepared, cfg.model_copy(update={"extractor": e}), tmp_path / e, threads=1)
           for e in ("torch", "onnxruntime")}
    assert list(got["torch"].indices) == [0, 1, 2, 3] and got["torch"].layout[-1][2] == got["torch"].splits["val"].shape[1]
    for split in ("train", "val", "test"):
        np.testing.assert_allclose(got["onnxruntime"].splits[split], got["torch"].splits[split], rtol=1e-3, atol=1e-4)
    (cache,) = (tmp_path / "torch").glob("*.safetensors")
    before = cache.stat().st_mtime_ns
    again = stage_features(model, prepared, cfg.model_copy(update={"extractor": "torch"}), tmp_path / "torch")
    assert cache.stat().st_mtime_ns == before
    np.testing.assert_array_equal(again.splits["test"], got["torch"].splits["test"])


def test_first_gate_arrays_still_read():
    """A bundle of the first gate (pooled features only: means, chol) scores as one stage."""
    rng = np.random.default_rng(0)
    means, chol = rng.normal(size=(3, 4)), np.tril(rng.random((4, 4))) + np.eye(4)
    stats = OODStats.from_arrays({"means": means, "chol": chol, "threshold": np.array([2.0])})
    x = rng.normal(size=(5, 4))
    want = np.min([(((x - m) @ chol) ** 2).sum(1) for m in means], axis=0)
    assert stats.indices == () and stats.threshold == 2.0
    np.testing.assert_allclose(stats.score(x), want)
    again = OODStats.from_arrays(stats.arrays())
    np.testing.assert_allclose(again.score(x), want)


def test_temperature_lowers_nll_of_an_overconfident_model():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 600)
    noisy = np.where(rng.random(600) < 0.3, rng.integers(0, 3, 600), y)  # 30% of the answers wrong
    logits = 12.0 * np.eye(3)[noisy] + rng.normal(0, 1, (600, 3))  # ...but always ~1.0 sure
    t = fit_temperature(logits, y)
    assert t > 2
    assert nll(logits, y, t) < 0.5 * nll(logits, y, 1.0)
    assert ece(y, softmax(logits / t)) < ece(y, softmax(logits))


def test_bootstrap_interval_contains_the_estimate_and_is_seeded():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 300)
    pred = np.where(rng.random(300) < 0.8, y, rng.integers(0, 3, 300))
    a, b = bootstrap_ci(y, pred, 3, seed=5), bootstrap_ci(y, pred, 3, seed=5)
    assert a == b and bootstrap_ci(y, pred, 3, seed=6) != a
    acc = (pred == y).mean()
    assert a["accuracy"][0] < acc < a["accuracy"][1] and a["accuracy"][1] - a["accuracy"][0] < 0.2
    for c in range(3):
        rec = (pred[y == c] == c).mean()
        assert a["per_class"][c]["recall"][0] <= rec <= a["per_class"][c]["recall"][1]


def test_metrics_carry_calibration_and_intervals(tiny_models):
    m = load_bundle(tiny_models / "tiny").metadata.test_metrics
    assert None not in (m.ece, m.brier, m.ci, m.macro_f1, m.temperature, m.before_temperature, m.ood_rate)
    assert len(m.reliability.bins) == 15
    assert all(e.ci is not None and len(e.ci.f1) == 2 for e in m.per_class.values())
    md = (tiny_models / "tiny" / "1" / "report" / "metrics.md").read_text()
    assert "ECE (15 bins)" in md and "reliability.png" in md


def _strip_trust(bundle_dir):
    """What a bundle written before trust/ looks like to the reader: no trust, one ONNX output."""
    meta = json.loads((bundle_dir / "metadata.json").read_text())
    meta.pop("trust")
    meta["onnx"]["outputs"] = meta["onnx"]["outputs"][:1]
    (bundle_dir / "metadata.json").write_text(json.dumps(meta))
    (bundle_dir / "trust.safetensors").unlink()


def test_predict_json_fields(tiny_models, tiny_data, bundle_copy, tmp_path):
    paths, _ = _images(tiny_data, 2)
    out = tmp_path / "pred.json"
    r = runner.invoke(app, ["predict", *map(str, paths), "--model", str(tiny_models / "tiny"), "--json", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())["results"]
    assert all(isinstance(x["in_distribution"], bool) and x["ood_score"] > 0 for x in res)
    assert all((x["label"] is None) == (not x["in_distribution"]) for x in res)  # rejected: no label
    _strip_trust(bundle_copy)
    r = runner.invoke(app, ["predict", str(paths[0]), "--model", str(bundle_copy), "--json", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())["results"][0]
    assert res["in_distribution"] is None and res["ood_score"] is None and len(res["probabilities"]) == 3


def test_with_ood_signature_over_tf_serving_rest(tiny_models, tiny_data, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(tiny_models / "tiny" / "1", models / "tiny" / "1")
    shutil.copytree(tiny_models / "tiny" / "1", models / "old" / "1")
    _strip_trust(models / "old" / "1")
    _, x = _images(tiny_data, 2)
    x = np.concatenate([x, np.random.default_rng(3).random((1, 64, 64), np.float32)])[..., None]
    want_p, want_s, want_in = load_bundle(models / "tiny").predict_with_ood(x[..., 0])
    with running_server(ServeSettings(models=models, rescan_seconds=60)) as url:
        sigs = requests.get(f"{url}/v1/models/tiny/metadata", timeout=10).json()["metadata"]["signature_def"]
        assert set(sigs["signature_def"]) == {"serving_default", "with_ood"}
        assert sigs["signature_def"]["serving_default"] == signature_def(64, 64, 3)["signature_def"]["serving_default"]
        assert set(sigs["signature_def"]["with_ood"]["outputs"]) == {"probabilities", "ood_score", "in_distribution"}
        plain = requests.post(f"{url}/v1/models/tiny:predict", json={"instances": x.tolist()}, timeout=30).json()
        assert set(plain) == {"predictions"}
        np.testing.assert_allclose(plain["predictions"], want_p, atol=1e-5)
        body = {"signature_name": "with_ood", "instances": x.tolist()}
        rows = requests.post(f"{url}/v1/models/tiny:predict", json=body, timeout=30).json()["predictions"]
        assert [set(r) for r in rows] == [{"probabilities", "ood_score", "in_distribution"}] * 3
        np.testing.assert_allclose([r["probabilities"] for r in rows], want_p, atol=1e-5)
        np.testing.assert_allclose([r["ood_score"] for r in rows], want_s, rtol=1e-4)
        assert [r["in_distribution"] for r in rows] == want_in.tolist() and rows[-1]["in_distribution"] is False
        col = requests.post(f"{url}/v1/models/tiny:predict", timeout=30,
                            json={"signature_name": "with_ood", "inputs": x.tolist()}).json()["outputs"]
        assert col["in_distribution"] == want_in.tolist()
        # a bundle written before trust/: serving_default only, with_ood refused as TF Serving would
        old = requests.get(f"{url}/v1/models/old/metadata", timeout=10).json()["metadata"]["signature_def"]
        assert set(old["signature_def"]) == {"serving_default"}
        r = requests.post(f"{url}/v1/models/old:predict", json=body, timeout=30)
        assert r.status_code == 400 and "with_ood" in r.json()["error"]
        noise = (np.random.default_rng(4).random((64, 64)) * 255).astype(np.uint8)
        up = _upload(url, noise)
        assert up["in_distribution"] is False and "no diagnosis" in up["warning"]


def _upload(url, pixels):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return requests.post(f"{url}/api/v1/predict?model=tiny", files={"file": ("x.png", buf.getvalue(), "image/png")},
                         timeout=30).json()


@pytest.mark.slow  # in `make test`, not in `make test-fast`
def test_audit_flags_a_planted_marker(tiny_models, tiny_data, tmp_path):
    from covid_cxr.trust.planted import plant

    marked = plant(tiny_data, tmp_path / "marked")
    results = {}
    for name, data in (("clean", tiny_data), ("marked", marked)):
        out = tmp_path / f"audit-{name}"
        r = runner.invoke(app, ["audit", "--model", str(tiny_models / "tiny"), "--data", str(data), "--out", str(out),
                                "--json", str(tmp_path / f"{name}.json"), "--per-class", "12", "--cam-per-class", "2"])
        assert r.exit_code == 0, r.output
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
        assert (out / "audit.md").is_file() and (out / "occlusion.png").is_file()
        assert "fixed central region" in (out / "audit.md").read_text()
    acq = {k: v["probes"]["acquisition"]["balanced_accuracy"] for k, v in results.items()}
    key = "size, format, bit depth, borders, corners"
    assert results["marked"]["shortcut_suspected"] and any("acquisition" in x for x in results["marked"]["reasons"])
    assert not results["clean"]["probes"]["acquisition"]["suspect"]
    assert acq["marked"][key] > acq["clean"][key] + 0.2


def test_evaluate_json_has_calibration_intervals_and_ood_rate(tiny_models, tiny_data, tmp_path):
    r = runner.invoke(app, ["evaluate", "--model", str(tiny_models / "tiny"), "--data", str(tiny_data),
                            "--out", str(tmp_path / "rep"), "--json", str(tmp_path / "m.json")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert {"accuracy", "macro_f1", "ece", "brier", "ood_rate", "ci"} <= set(m)
    assert m["ci"]["accuracy"][0] <= m["accuracy"] <= m["ci"]["accuracy"][1]
    assert all(len(e["ci"]["recall"]) == 2 for e in m["per_class"].values())
    assert (tmp_path / "rep" / "reliability.png").is_file() and "out of distribution" in r.output


@pytest.mark.slow  # trains a fine-tuned model: in `make test`, not in `make test-fast`
def test_staged_finetune_takes_the_gate_statistics_from_the_trunk_pass(tiny_data, tmp_path, monkeypatch):
    """Staged fine-tuning (Lite): every gate stage lies in the frozen trunk, so its statistics come from
    the trunk's ONNX pass (cached per image) and the trust step runs no second pass through the
    backbone; they equal StageStats of the bundle's model, and the bundle's graph scores them alike."""
    import torch

    from covid_cxr.data import prepare
    from covid_cxr.features.cache import FeatureCache
    from covid_cxr.train.fit import TrainConfig, train
    from covid_cxr.trust import fit as trust_fit
    from covid_cxr.trust import stages

    def second_pass(*args, **kwargs):
        raise AssertionError("the trust step ran the fine-tuned backbone again")

    seen, fit_trust = [], trust_fit.fit_trust
    monkeypatch.setattr(stages, "stage_runner", second_pass)
    monkeypatch.setattr(trust_fit, "fit_trust", lambda m, f, s: seen.append(s) or fit_trust(m, f, s))
    cfg = TrainConfig(weights="none", image_size=64, epochs=1, finetune=True, finetune_views=2, finetune_epochs=1,
                      lr_find=False, progress=False, name="staged")
    b = load_bundle(train(tiny_data, tmp_path / "models", cfg, workdir=tmp_path / "work").bundle_path)
    (got,) = seen
    model, arrays = load_torch(b), b.trust_arrays()
    assert list(got.indices) == [0, 1, 2, 3] and got.layout == stages.stage_layout(model, got.indices)
    prepared = prepare(tiny_data, cfg.classes, cfg.balance, cfg.max_per_class, cfg.seed, progress=False)
    (cache,) = (tmp_path / "work" / "feature-cache").glob("*-trunk6-view0-stats*.safetensors")
    rows, pooled = FeatureCache(cache).rows, model.num_features
    for split in ("train", "val", "test"):
        recs = prepared.splits[split]
        x = load_batch([prepared.manifest.root / r.path for r in recs], 64, 64)
        with torch.no_grad():
            want = stages.StageStats(model, got.indices)(torch.from_numpy(x)[:, None]).numpy()
        np.testing.assert_allclose(got.splits[split], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        np.testing.assert_array_equal(got.splits[split][:, pooled:], np.stack([rows[r.sha256] for r in recs]))
        score = b.predict_with_ood(x)[1]
        np.testing.assert_allclose(score, OODStats.from_arrays(arrays).score(got.splits[split]), rtol=1e-3)
