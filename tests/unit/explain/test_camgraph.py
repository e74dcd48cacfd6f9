"""Grad-CAM inside the graph: the closed form equals pytorch-grad-cam, cam.onnx is written, checked
and read without torch, and bundles without it are refused with a way out."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from covid_cxr.bundle import BundleError, load_bundle
from covid_cxr.bundle.reader import NoCamGraph
from covid_cxr.explain.camgraph import CamGraph, closed_form_holds, head_jacobian
from covid_cxr.explain.gradcam import Explainer
from covid_cxr.explain.render import GraphExplainer
from covid_cxr.models import create_model
from covid_cxr.models.classifier import EnsembleClassifier, Head
from covid_cxr.models.loading import load_torch

SIZE = 64
TOL = 1e-3  # what the bundle writer accepts (MAX_CAM_DIFF); measured ~1e-6


def images(n: int = 4, seed: int = 0) -> np.ndarray:
    """Smooth random images (a blurred noise field), so the maps are not all flat."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, SIZE // 8, SIZE // 8)).astype(np.float32)
    return np.kron(x, np.ones((8, 8), np.float32))


def lite0(hidden=(32,), seed=0):
    torch.manual_seed(seed)
    model, _ = create_model("efficientnet_lite0", weights="none", hidden=hidden)
    return model.eval()


def pytorch_grad_cam(model, x: np.ndarray, classes: int = 3) -> np.ndarray:
    explainer = Explainer(model)
    try:
        return np.stack([np.stack([e.cam for e in explainer.explain(x, c)]) for c in range(classes)], axis=1)
    finally:
        explainer.close()


def test_head_jacobian_is_autograd():
    head = Head(16, 3, hidden=(8, 6), dropout=0.3).eval()
    pooled = torch.randn(5, 16)
    logits, jac = head_jacobian(head, pooled)
    want = torch.autograd.functional.jacobian(lambda p: head(p).sum(0), pooled).permute(1, 0, 2)
    torch.testing.assert_close(logits, head(pooled))
    torch.testing.assert_close(jac, want)
    bad = Head(16, 3, hidden=(8,))
    bad.net[1] = torch.nn.Tanh()  # no closed form through it: refused, not guessed
    with pytest.raises(ValueError, match="Tanh"):
        head_jacobian(bad, pooled)


@pytest.mark.parametrize("ensemble", [False, True])
def test_closed_form_equals_pytorch_grad_cam(ensemble):
    model = lite0()
    if ensemble:
        model = EnsembleClassifier([model, lite0((16, 8), seed=1)],
                                   "members.0.backbone.bn2,members.1.backbone.bn2", [1.5, 0.7]).eval()
    assert closed_form_holds(model, SIZE, SIZE)
    x = images()
    with torch.no_grad():
        got = CamGraph(model, SIZE, SIZE).eval()(torch.from_numpy(x[..., None])).numpy()
    want = pytorch_grad_cam(model, x)
    assert got.shape == want.shape == (4, 3, SIZE, SIZE)
    assert np.abs(got - want).max() <= TOL
    assert np.abs(got[:, 0] - got[:, 1]).max() > 0.05  # the classes' maps differ: the comparison has teeth


def test_closed_form_refused_where_the_layer_is_not_the_pooled_map():
    model = lite0()
    assert closed_form_holds(model, SIZE, SIZE)
    model.spec = dataclasses.replace(model.spec, cam_layer="blocks.5")  # below the pooled map (as VGG's is)
    assert not closed_form_holds(model, SIZE, SIZE)
    ens = EnsembleClassifier([lite0(), lite0(seed=1)], "members.0.backbone.bn2")  # one layer for two members
    assert not closed_form_holds(ens, SIZE, SIZE)


def test_bundle_has_cam_onnx_checked_and_read_without_torch_model(tiny_models):
    bundle = load_bundle(tiny_models / "tiny")
    cam = bundle.metadata.cam
    assert bundle.has_cam and (bundle.path / "cam.onnx").is_file()
    assert cam.outputs[0].shape == [-1, 3, SIZE, SIZE] and cam.parity_images > 0
    assert cam.parity_max_abs_diff <= TOL and cam.layer == "bn2"
    x = images(3)
    graph = GraphExplainer(bundle)
    want = pytorch_grad_cam(load_torch(bundle), x)
    for c in range(3):
        got = graph.explain(x, c)
        assert np.abs(np.stack([e.cam for e in got]) - want[:, c]).max() <= TOL
        np.testing.assert_allclose(np.stack([e.probabilities for e in got]), bundle.predict(x), atol=1e-6)
    predicted = graph.explain(x)
    assert [e.class_index for e in predicted] == list(bundle.predict(x).argmax(1))
    with pytest.raises(ValueError, match="out of range"):
        graph.explain(x, 3)
    with pytest.raises(ValueError, match="Grad-CAM only"):
        graph.explain(x, 0, method="scorecam")


def test_bundle_without_cam_is_refused_with_a_way_out(bundle_copy):
    meta = json.loads((bundle_copy / "metadata.json").read_text())
    meta.pop("cam")
    (bundle_copy / "metadata.json").write_text(json.dumps(meta))
    (bundle_copy / "cam.onnx").unlink()
    old = load_bundle(bundle_copy)  # an old bundle still loads and predicts
    assert not old.has_cam and old.predict(images(1)).shape == (1, 3)
    with pytest.raises(NoCamGraph, match="no Grad-CAM output .*add-cam"):
        old.cam_session()


def test_cam_metadata_and_file_must_agree(bundle_copy, tiny_models):
    (bundle_copy / "cam.onnx").unlink()
    with pytest.raises(BundleError, match="cam.onnx: missing"):
        load_bundle(bundle_copy)
    shutil.copyfile(tiny_models / "tiny" / "1" / "model.onnx", bundle_copy / "cam.onnx")  # the wrong graph
    with pytest.raises(BundleError, match="cam.onnx: has outputs"):
        load_bundle(bundle_copy).cam_session()
    meta = json.loads((bundle_copy / "metadata.json").read_text())
    meta["cam"]["outputs"][0]["shape"] = [-1, 3, SIZE, SIZE + 1]
    (bundle_copy / "metadata.json").write_text(json.dumps(meta))
    shutil.copyfile(tiny_models / "tiny" / "1" / "cam.onnx", bundle_copy / "cam.onnx")
    with pytest.raises(BundleError, match=r"cam.onnx: output 'cam' has shape \[-1, 3, 64, 64\]; metadata.json says"):
        load_bundle(bundle_copy).cam_session()


@pytest.mark.slow  # exports the graph and checks it against pytorch-grad-cam
def test_add_cam_publishes_the_next_version(bundle_copy):
    from typer.testing import CliRunner

    from covid_cxr.publish.writer import add_cam
    from covid_cxr.cli import app

    meta = json.loads((bundle_copy / "metadata.json").read_text())
    meta.pop("cam")
    (bundle_copy / "metadata.json").write_text(json.dumps(meta))
    (bundle_copy / "cam.onnx").unlink()
    new = add_cam(bundle_copy.parent)
    assert new.version == 2 and new.has_cam and new.metadata.cam.parity_max_abs_diff <= TOL
    assert not load_bundle(bundle_copy).has_cam  # the old version is left as it was
    x = images(2)
    np.testing.assert_array_equal(load_bundle(new.path).predict(x), load_bundle(bundle_copy).predict(x))
    with pytest.raises(BundleError, match="already has cam.onnx"):
        add_cam(new.path)
    r = CliRunner().invoke(app, ["bundle", "add-cam", str(new.path)])
    assert r.exit_code == 2 and "error:" in r.output and "already has cam.onnx" in r.output
    r = CliRunner().invoke(app, ["bundle", "check", str(new.path)])
    assert r.exit_code == 0, r.output


def test_explain_cli_draws_from_cam_onnx_without_torch(tiny_models, tiny_data, tmp_path):
    import subprocess
    import sys

    image = sorted((tiny_data / "Normal").glob("*.png"))[0]
    code = ("import sys; from typer.testing import CliRunner; from covid_cxr.cli import app; "
            f"r = CliRunner().invoke(app, ['explain', {str(image)!r}, '--model', {str(tiny_models / 'tiny')!r}, "
            f"'--out', {str(tmp_path / 'out')!r}, '--no-progress']); print(r.exit_code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.split()[-2:] == ["0", "False"], out.stdout[-1500:] + out.stderr[-1500:]
    cam = np.load(tmp_path / "out" / f"{image.stem}_cam.npy")
    bundle = load_bundle(tiny_models / "tiny")
    from covid_cxr.data.decode import load_for_model

    want = pytorch_grad_cam(load_torch(bundle), load_for_model(image, SIZE, SIZE)[None])[0]  # classes x H x W
    assert cam.shape == (SIZE, SIZE) and np.abs(want - cam[None]).max(axis=(1, 2)).min() <= TOL  # one class's map
