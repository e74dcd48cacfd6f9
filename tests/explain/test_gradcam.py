"""Grad-CAM: the map points at what the model looks at, on every architecture, frozen or not.

The main test trains a small detector for a synthetic bright square pasted on real X-rays and
checks that Grad-CAM's hot region sits on the square in held-out images (and not on the squares of
other images: a chance-level control that a map hugging the image centre or the anatomy would fail).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from covid_cxr.data.decode import load_for_model
from covid_cxr.explain.gradcam import (METHODS, Explainer, explain_array, explainer_for_bundle, overlay,
                                       overlay_for_bundle)
from covid_cxr.models import create_model, get_spec, list_archs

SIZE = 128  # input side for the detector (a 4 x 4 map at the stride-32 layer)
PATCH = 32  # side of the synthetic square
N_TRAIN, N_TEST = 160, 40


def _xrays(data_dir: Path, n: int, size: int, seed: int = 0) -> np.ndarray:
    files = []
    for d in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        files += sorted(d.glob("*.png"))[: n // 3 + 10]
    rng = np.random.default_rng(seed)
    rng.shuffle(files)
    return np.stack([load_for_model(f, size, size) for f in files[:n]])


def _paste(images: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[int, int]]]:
    out, boxes = images.copy(), []
    for img in out:
        r, c = (int(v) for v in rng.integers(0, SIZE - PATCH + 1, size=2))
        img[r:r + PATCH, c:c + PATCH] = 1.0
        boxes.append((r, c))
    return out, boxes


def _distance_to_box(point, box) -> float:
    """Pixels from (row, col) to the nearest pixel of the PATCH x PATCH square at `box`; 0 inside."""
    (pr, pc), (r, c) = point, box
    dr = max(r - pr, 0.0, pr - (r + PATCH - 1))
    dc = max(c - pc, 0.0, pc - (c + PATCH - 1))
    return float(np.hypot(dr, dc))


@pytest.fixture(scope="module")
def patch_detector(data_dir):
    """efficientnet_lite0 (ImageNet backbone, last stages unfrozen, linear head) trained to tell
    an X-ray with a bright square from the same X-ray without one. Each batch pairs every image
    with a copy carrying a square at a fresh random place, so only the square predicts the label."""
    threads = torch.get_num_threads()
    # small batches: one thread; beside another busy process 2 threads took 117 s here, 1 thread 21 s
    torch.set_num_threads(1)
    try:
        yield _train_patch_detector(data_dir)
    finally:
        torch.set_num_threads(threads)


def _train_patch_detector(data_dir):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    base = _xrays(data_dir, N_TRAIN + N_TEST, SIZE)
    train, test = base[:N_TRAIN], base[N_TRAIN:]
    spec = get_spec("efficientnet_lite0")
    model, _ = create_model("efficientnet_lite0", weights="imagenet", num_classes=2, hidden=())
    model.freeze_backbone(trainable=spec.finetune_modules)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-2)
    for _ in range(6):
        model.train()
        order = rng.permutation(N_TRAIN)
        for i in range(0, N_TRAIN, 16):
            clean = train[order[i:i + 16]]
            patched, _ = _paste(clean, rng)
            x = torch.from_numpy(np.concatenate([clean, patched]))[:, None]
            y = torch.cat([torch.zeros(len(clean)), torch.ones(len(clean))]).long()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    test_patched, boxes = _paste(test, rng)
    with torch.no_grad():
        pred_clean = model(torch.from_numpy(test)[:, None]).argmax(1).numpy()
        pred_patched = model(torch.from_numpy(test_patched)[:, None]).argmax(1).numpy()
    accuracy = float(((pred_clean == 0).mean() + (pred_patched == 1).mean()) / 2)
    return model, test_patched, boxes, accuracy


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam"])
def test_gradcam_finds_the_patch(patch_detector, method, artifacts_dir):
    model, images, boxes, accuracy = patch_detector
    assert accuracy >= 0.85, f"the detector did not learn the patch (held-out accuracy {accuracy:.2f})"
    assert not any(p.requires_grad for n, p in model.backbone.named_parameters() if n.startswith("blocks.0"))

    exps = Explainer(model).explain(images, class_index=1, method=method)
    hot = [_distance_to_box(e.hotspot(), b) for e, b in zip(exps, boxes)]
    # control (chance level): each map against the squares of all the other images
    control = [_distance_to_box(e.hotspot(), b) for k, e in enumerate(exps) for j, b in enumerate(boxes) if j != k]
    peak = [_distance_to_box(e.peak, b) for e, b in zip(exps, boxes)]
    on_patch = float(np.mean(np.array(hot) <= 4))
    on_other = float(np.mean(np.array(control) <= 4))
    summary = {"method": method, "input": SIZE, "patch": PATCH, "held_out_accuracy": accuracy,
               "hotspot_within_4px": on_patch, "control_within_4px": on_other,
               "argmax_within_4px": float(np.mean(np.array(peak) <= 4)),
               "argmax_within_16px": float(np.mean(np.array(peak) <= 16)),
               "hotspot_distance_px": [round(d, 1) for d in hot]}
    (artifacts_dir / f"gradcam_patch_{method}.json").write_text(json.dumps(summary, indent=2) + "\n")
    if method == "gradcam":
        from PIL import Image

        tiles = [overlay(img, e.cam) for img, e in zip(images[:8], exps[:8])]
        Image.fromarray(np.concatenate(tiles, axis=1)).save(artifacts_dir / "gradcam_patch.png")
    assert all(e.cam.shape == (SIZE, SIZE) for e in exps)
    assert on_patch >= 0.8, summary
    assert on_other <= 0.3, summary  # chance: about 0.13


@pytest.fixture(scope="module")
def xray(data_dir) -> np.ndarray:
    return load_for_model(sorted((data_dir / "COVID").glob("*.png"))[0], 96, 96)


@pytest.mark.parametrize("arch", list_archs())
def test_every_architecture_with_frozen_backbone(arch, xray):
    """Random weights, frozen backbone: gradients still reach the registered layer, in-place
    ReLUs (VGG, DenseNet) do not break the hooks, and the caller's model is left as it was."""
    torch.manual_seed(0)
    model, _ = create_model(arch, weights="none", num_classes=2)
    model.eval()  # (DenseNet's head has dropout)
    model.backbone.get_submodule(model.spec.cam_layer)  # the registered layer exists
    with torch.no_grad():  # a head whose class-0 logit grows with every feature: its map cannot be all zero
        for lin in (m for m in model.head.modules() if isinstance(m, torch.nn.Linear)):
            lin.weight.abs_()
            lin.bias.zero_()
    inplace_before = {n: m.inplace for n, m in model.named_modules() if isinstance(getattr(m, "inplace", None), bool)}
    with torch.no_grad():
        before = model(torch.from_numpy(xray)[None, None])

    e = explain_array(model, xray, class_index=0)

    assert e.cam.shape == xray.shape and e.cam.dtype == np.float32
    assert np.isfinite(e.cam).all() and e.cam.min() >= 0 and e.cam.max() <= 1
    assert e.cam.max() - e.cam.min() > 0.5 and e.cam.std() > 0.05, "constant map: no gradient reached the layer"
    assert e.class_index == 0 and e.probabilities.shape == (2,) and abs(e.probabilities.sum() - 1) < 1e-5
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert inplace_before == {n: m.inplace for n, m in model.named_modules()
                              if isinstance(getattr(m, "inplace", None), bool)}
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(before, model(torch.from_numpy(xray)[None, None]))
    if arch in ("vgg16", "densenet121"):
        assert any(inplace_before.values())  # the case the light copy exists for


@pytest.fixture(scope="module")
def lite(xray):
    torch.manual_seed(0)
    model, _ = create_model("efficientnet_lite0", weights="none", num_classes=3)
    return model


@pytest.mark.parametrize("method", METHODS)
def test_every_method(lite, xray, method):
    small = xray[::2, ::2].copy()  # 48 x 48 keeps ScoreCAM (one forward per channel) quick
    e = explain_array(lite, small, method=method)
    assert e.cam.shape == small.shape and np.isfinite(e.cam).all()
    assert 0 <= e.cam.min() and e.cam.max() <= 1
    assert e.class_index == e.predicted_index and e.method == method


def test_batch_matches_single_and_bad_arguments(lite, xray):
    ex = Explainer(lite)
    other = np.ascontiguousarray(xray[::-1])
    batch = ex.explain(np.stack([xray, other]), class_index=[2, None])
    single = [ex.explain(xray, 2)[0], ex.explain(other)[0]]
    for b, s in zip(batch, single):
        np.testing.assert_allclose(b.cam, s.cam, atol=1e-4)
        np.testing.assert_allclose(b.probabilities, s.probabilities, atol=1e-5)
        assert b.class_index == s.class_index
    uint8 = ex.explain((xray * 255).round().astype(np.uint8))[0]  # 8-bit pixels are scaled to [0, 1]
    np.testing.assert_allclose(uint8.probabilities, single[0].probabilities, atol=1e-2)
    with pytest.raises(ValueError, match="out of range"):
        ex.explain(xray, class_index=3)
    with pytest.raises(ValueError, match="unknown CAM method"):
        ex.explain(xray, method="nonsense")
    with pytest.raises(ValueError, match="grayscale"):
        ex.explain(np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="not found"):
        Explainer(lite, layer="no.such.layer")


def test_overlay_colours(xray):
    cam = np.zeros_like(xray)
    cam[10:20, 30:40] = 1.0
    rgb = overlay(xray, cam, alpha=0.4)
    assert rgb.shape == (*xray.shape, 3) and rgb.dtype == np.uint8
    gray = np.rint(xray * 255)
    np.testing.assert_allclose(overlay(xray, cam, alpha=0.0), np.repeat(gray[..., None], 3, axis=2), atol=1)
    pure = overlay(xray, cam, alpha=1.0)
    assert tuple(pure[15, 35]) == (128, 0, 0)  # jet: the maximum is dark red
    assert tuple(pure[0, 0]) == (0, 0, 128)  # ... and zero is dark blue
    assert int(rgb[15, 35, 0]) > int(rgb[15, 35, 2]) and int(rgb[0, 0, 2]) >= int(rgb[0, 0, 0])
    small = overlay(xray, cam[::2, ::2])  # a map at another resolution is resized to the image
    assert small.shape == rgb.shape
    with pytest.raises(ValueError):
        overlay(xray, cam, alpha=1.5)


# ---------------------------------------------------------------------------- with a real bundle

def test_overlay_for_bundle(bundle_dir, data_dir):
    from PIL import Image

    from covid_cxr.bundle import load_bundle
    from covid_cxr.data.decode import decode_file, resize

    bundle = load_bundle(bundle_dir)
    h, w = bundle.input_hw
    raw = decode_file(sorted((data_dir / "Viral Pneumonia").glob("*.png"))[0]).pixels  # 256 x 256
    png, e = overlay_for_bundle(bundle, raw)
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.mode == "RGB" and img.size == (w, h)
    assert e.cam.shape == (h, w) and e.class_index == e.predicted_index
    onnx = bundle.predict(np.clip(resize(raw, h, w), 0, 1)[None])[0]  # same probabilities as the server's
    np.testing.assert_allclose(e.probabilities, onnx, atol=1e-4)
    assert explainer_for_bundle(bundle) is explainer_for_bundle(bundle_dir)  # loaded once per bundle
    png1, e1 = overlay_for_bundle(bundle, raw, class_index=1, method="layercam", alpha=0.6)
    assert e1.class_index == 1 and png1 != png


def test_cli_explains_a_folder_and_skips_a_corrupt_file(bundle_dir, data_dir, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from covid_cxr.bundle import load_bundle
    from covid_cxr.cli import app

    src = tmp_path / "images"
    src.mkdir()
    xrays = [sorted((data_dir / c).glob("*.png"))[0] for c in ("COVID", "Normal")]
    for f in xrays:
        (src / f.name).write_bytes(f.read_bytes())
    (src / "broken.png").write_bytes(xrays[0].read_bytes()[:400])  # truncated
    (src / "notes.txt").write_text("not an image")
    single = sorted((data_dir / "Viral Pneumonia").glob("*.png"))[0]
    out = tmp_path / "cams"

    r = CliRunner().invoke(app, ["explain", str(src), str(single), "--model", str(bundle_dir.parent),
                                 "--out", str(out), "--class", "normal", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "broken.png" in r.output and "skipped" in r.output
    assert "3 explained, 1 skipped" in " ".join(r.output.split())
    stems = [f.stem for f in xrays] + [single.stem]
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{s}_cam.png" for s in stems] +
                                                           [f"{s}_cam.npy" for s in stems])
    h, w = load_bundle(bundle_dir).input_hw
    for s in stems:
        cam = np.load(out / f"{s}_cam.npy")
        assert cam.shape == (h, w) and cam.dtype == np.float32 and 0 <= cam.min() and cam.max() <= 1
        assert Image.open(out / f"{s}_cam.png").size == (w, h)
    assert "Normal" in r.output

    bad = CliRunner().invoke(app, ["explain", str(src), "--model", str(bundle_dir), "--out", str(out),
                                   "--class", "Martian"])
    assert bad.exit_code == 2 and "unknown class" in bad.output
    none = CliRunner().invoke(app, ["explain", str(src / "broken.png"), "--model", str(bundle_dir),
                                    "--out", str(tmp_path / "none"), "--no-progress"])
    assert none.exit_code == 1 and "0 explained, 1 skipped" in " ".join(none.output.split())
