"""Lung segmentation: the group split, a real tiny bundle (64 px, 1 epoch, random weights) through
train -> bundle check -> evaluate -> segment, the sanity check, the zone naming and lung-only crops.
Images are drawn: two dark 'lungs' (ellipses) in a brighter chest on a black background."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from covid_cxr.cli import app

S = 64


def _ellipse(h, w, cy, cx, ry, rx):
    yy, xx = np.mgrid[:h, :w]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def draw_pair(rng, size=S):
    """A chest-like picture and its two-lung mask, jittered."""
    cy, dx = size * (0.5 + rng.uniform(-0.05, 0.05)), size * (0.2 + rng.uniform(-0.02, 0.02))
    ry, rx = size * rng.uniform(0.25, 0.3), size * rng.uniform(0.1, 0.13)
    mask = _ellipse(size, size, cy, size / 2 - dx, ry, rx) | _ellipse(size, size, cy, size / 2 + dx, ry, rx)
    body = _ellipse(size, size, size / 2, size / 2, size * 0.45, size * 0.42)
    img = np.where(body, 0.75, 0.02) - 0.45 * mask + rng.normal(0, 0.04, (size, size))
    return np.clip(img, 0, 1), mask


@pytest.fixture(scope="module")
def lung_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lung-data")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(14):
        img, mask = draw_pair(rng)
        pid = f"p{i:02d}"
        Image.fromarray((img * 255).astype(np.uint8)).save(root / "images" / f"{pid}.png")
        Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(root / "masks" / f"{pid}.png")
        dup = "p01" if i == 0 else ("p00" if i == 1 else "")
        rows.append({"id": pid, "source": "a" if i % 2 else "b", "near_dup_ids": dup})
    with (root / "manifest.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["id", "source", "near_dup_ids"])
        w.writeheader()
        w.writerows(rows)
    return root


SLOW_LUNGS = pytest.mark.slow  # these need lung_models: a lung U-Net trained for the module (~15 s quiet)


@pytest.fixture(scope="module")
def lung_models(tmp_path_factory, lung_data):
    from covid_cxr.core.lung_config import LungConfig
    from covid_cxr.train.lungs import train_lungs

    out = tmp_path_factory.mktemp("lung-models")
    cfg = LungConfig(weights="none", image_size=S, epochs=1, batch_size=4, progress=False, frozen_stages=0,
                     split_fractions=[0.6, 0.2, 0.2])
    train_lungs(lung_data, out, cfg, workdir=tmp_path_factory.mktemp("lung-work"))
    return out


def test_group_split_keeps_duplicates_together_and_every_source_everywhere(lung_data):
    from covid_cxr.data.lung_masks import group_split, load_pairs

    pairs = load_pairs(lung_data, 32)
    split = group_split(pairs, (0.6, 0.2, 0.2), seed=1)
    where = {pairs.ids[i]: s for s, idx in split.items() for i in idx}
    assert where["p00"] == where["p01"]
    assert sorted(where) == sorted(pairs.ids)
    for s in ("train", "test"):
        assert {pairs.sources[i] for i in split[s]} == {"a", "b"}


@SLOW_LUNGS
def test_lung_bundle_is_a_checked_segmentation_bundle(lung_models):
    from covid_cxr.bundle import check_bundle
    from covid_cxr.lungs.segment import LungSegmenter

    b = check_bundle(lung_models / "lungs")
    assert b.metadata.task == "segmentation" and b.metadata.onnx.outputs[0].name == "mask"
    assert b.metadata.segmentation.test_metrics.n >= 2
    res = CliRunner().invoke(app, ["bundle", "check", str(lung_models / "lungs")])
    assert res.exit_code == 0 and "segmentation" in res.output
    masks = LungSegmenter.from_bundle(lung_models / "lungs").masks(np.random.rand(3, 80, 70).astype(np.float32))
    assert masks.shape == (3, 80, 70) and masks.dtype == bool


def test_classifier_bundle_is_refused_as_lung_model(tiny_models):
    from covid_cxr.bundle import BundleError
    from covid_cxr.lungs.segment import LungSegmenter

    with pytest.raises(BundleError, match="not a lung segmentation model"):
        LungSegmenter.from_bundle(tiny_models / "tiny")


@SLOW_LUNGS
def test_segmentation_metadata_needs_its_record(lung_models):
    from pydantic import ValidationError

    from covid_cxr.bundle import BundleMetadata

    raw = json.loads(next((lung_models / "lungs").glob("*/metadata.json")).read_text())
    raw.pop("segmentation")
    with pytest.raises(ValidationError, match="segmentation"):
        BundleMetadata.model_validate(raw)
    raw["task"] = "classification"  # a mask output is not a classifier's probabilities
    with pytest.raises(ValidationError, match="probabilities"):
        BundleMetadata.model_validate(raw)


@SLOW_LUNGS
def test_evaluate_writes_dice_per_source_and_segment_skips_bad_files(lung_models, lung_data, tmp_path):
    out = tmp_path / "m.json"
    res = CliRunner().invoke(app, ["lungs", "evaluate", "--model", str(lung_models / "lungs"), "--data",
                                   str(lung_data), "--json", str(out)])
    assert res.exit_code == 0, res.output
    m = json.loads(out.read_text())
    assert {"dice", "iou", "per_source", "n"} <= set(m) and m["n"] == 14 and set(m["per_source"]) == {"a", "b"}
    assert 0 <= m["iou"] <= m["dice"] <= 1
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    res = CliRunner().invoke(app, ["lungs", "segment", str(lung_data / "images" / "p03.png"), str(bad),
                                   "--model", str(lung_models / "lungs"), "--out", str(tmp_path / "seg")])
    assert res.exit_code == 0, res.output
    assert "bad.png" in res.output and "skipped" in res.output
    mask = np.asarray(Image.open(tmp_path / "seg" / "p03_mask.png"))
    assert mask.shape == (S, S) and set(np.unique(mask)) <= {0, 255}
    assert (tmp_path / "seg" / "p03_overlay.png").is_file()


def test_sanity_check_flags_one_blob_and_implausible_area():
    from covid_cxr.lungs.segment import sanity_check

    _, good = draw_pair(np.random.default_rng(3))
    assert sanity_check(good).ok
    one = good.copy()
    one[:, S // 2:] = False
    assert not sanity_check(one).ok
    assert any("area" in p for p in sanity_check(np.ones((S, S), bool)).problems)


def test_zones_name_the_patients_side():
    """The image's right half is the patient's left lung; the bottom third is the lower zone."""
    from covid_cxr.lungs.zones import cam_zones

    _, mask = draw_pair(np.random.default_rng(4))
    rows = np.nonzero(mask.any(1))[0]
    cam = np.zeros((S, S), np.float32)
    cam[rows.max() - 4:rows.max() - 1, S - 20:S - 8] = 1.0  # image right, bottom of the lung
    z = cam_zones(cam, mask)
    assert z.strongest == "left lower"
    assert z.summary.endswith("strongest: left lower zone")
    cam2 = np.zeros((S, S), np.float32)
    cam2[rows.min() + 1:rows.min() + 4, 8:20] = 1.0
    cam2[0:3, 0:3] = 1.0  # some mass outside
    z2 = cam_zones(cam2, mask)
    assert z2.strongest == "right upper" and 0 < z2.inside < 1


def test_lung_only_crops_keep_size_and_drop_outside():
    from covid_cxr.lungs.crop import crop_box, mask_outside

    img, mask = draw_pair(np.random.default_rng(5))
    boxed = crop_box(img, mask)
    assert boxed.shape == img.shape and not np.allclose(boxed, img)
    masked = mask_outside(img, mask)
    assert masked[0, 0] == 0 and np.allclose(masked[mask], img[mask])


@SLOW_LUNGS
def test_upload_api_adds_lung_fields_and_skips_the_lung_bundle(tiny_models, lung_models, lung_data, tmp_path):
    """A lung bundle beside the classifier is not served as a model; with --lungs the upload API
    reports the lung check and where Grad-CAM looks."""
    import shutil

    import requests

    from covid_cxr.serve.settings import ServeSettings
    from covid_cxr.serve.testing import running_server

    models = tmp_path / "models"
    shutil.copytree(tiny_models / "tiny", models / "tiny")
    shutil.copytree(lung_models / "lungs", models / "lungs")
    with running_server(ServeSettings(models=models, lungs=models / "lungs", rescan_seconds=0.2)) as url:
        names = [m["name"] for m in requests.get(f"{url}/api/v1/models", timeout=10).json()["models"]]
        assert names == ["tiny"]
        png = (lung_data / "images" / "p02.png").read_bytes()
        r = requests.post(f"{url}/api/v1/predict?gradcam=true", files={"file": ("p.png", png, "image/png")}, timeout=120)
        assert r.status_code == 200, r.text
        lungs = r.json()["lungs"]
        assert set(lungs) >= {"check_ok", "area"} and "inside the lungs" in lungs["summary"]
        assert 0 <= lungs["inside_share"] <= 1


def test_lung_crop_needs_a_lung_model_and_changes_the_run():
    from pydantic import ValidationError

    from covid_cxr.core.config import TrainConfig
    from covid_cxr.features.cache import cache_key

    with pytest.raises(ValidationError, match="--lung-crop needs --lungs"):
        TrainConfig(lung_crop="box")
    boxed = TrainConfig(lung_crop="box", lungs="MODELS/lungs")
    assert boxed.run_id() != TrainConfig().run_id()
    assert cache_key("a", "s", 64, 0.5, 0.2) != cache_key("a", "s", 64, 0.5, 0.2, "box", "MODELS/lungs")


@SLOW_LUNGS
def test_the_audit_takes_its_lung_fields_from_the_lung_model(lung_models, tiny_data):
    """Issue 11 item 5: `audit --lungs` masks come from the segmentation bundle, not the fixed region."""
    from covid_cxr.data.decode import load_batch
    from covid_cxr.lungs.segment import LungSegmenter
    from covid_cxr.trust.audit import ellipse_mask, lung_fields, lung_method

    images = load_batch(sorted(tiny_data.rglob("*.png"))[:3], 64, 64)
    bundle = next(p for p in lung_models.iterdir() if p.is_dir() and not p.name.startswith("."))
    got = lung_fields(images, bundle)
    np.testing.assert_array_equal(got, LungSegmenter.from_bundle(bundle).masks(images))
    assert not np.array_equal(got, np.broadcast_to(ellipse_mask(64, 64), got.shape))
    assert lung_method(bundle)["method"] == "segmentation"


@pytest.fixture(scope="module")
def band_lungs(tmp_path_factory, lung_models):
    """A lung bundle written by the real writer whose network is set by hand: lung = the dark band
    of draw_pair's chests (0.15 < x < 0.5), so its masks pass the sanity check and a crop really
    happens (the 1-epoch fixture's masks do not). Its record is lung_models' own."""
    import torch

    from covid_cxr.bundle.schema import BundleContent
    from covid_cxr.publish.writer import write_bundle

    class Band(torch.nn.Module):
        def forward(self, x):  # N x H x W x 1 in [0, 1] -> lung probability, same shape
            return torch.sigmoid(60 * (0.5 - x)) * torch.sigmoid(60 * (x - 0.15))

    meta = json.loads(next((lung_models / "lungs").glob("*/metadata.json")).read_text())
    content = BundleContent.model_validate({k: meta[k] for k in ("task", "architecture", "classes", "input",
                                                                 "segmentation")})
    parity = np.stack([draw_pair(np.random.default_rng(s))[0] for s in range(2)]).astype(np.float32)
    out = tmp_path_factory.mktemp("band-lungs")
    return write_bundle(out, "lungs", Band(), content, parity).path


@pytest.fixture(scope="module")
def crop_classifier(tmp_path_factory, tiny_data, band_lungs):
    """`covid-cxr train --lung-crop mask --lungs ...` at 64 px, then the lung bundle it was trained
    with is deleted: the classifier bundle must carry its own lung model."""
    import shutil

    from covid_cxr.train.fit import TrainConfig, train

    lungs = tmp_path_factory.mktemp("crop-lungs") / "lungs"
    shutil.copytree(band_lungs.parent, lungs)
    out = tmp_path_factory.mktemp("crop-models")
    cfg = TrainConfig(weights="none", image_size=S, epochs=1, lr_find=False, progress=False, name="cropped",
                      logger="none", lung_crop="mask", lungs=str(lungs))
    path = train(tiny_data, out, cfg, workdir=tmp_path_factory.mktemp("crop-work")).bundle_path
    shutil.rmtree(lungs)
    return path


@SLOW_LUNGS
def test_a_lung_crop_bundle_crops_wherever_it_is_read(crop_classifier, band_lungs):
    """Issue 11b: the reader (predict, evaluate, audit) and the server run a --lung-crop bundle on
    the cropped images, with the lung model it carries; whole images give other answers."""
    from covid_cxr.bundle import check_bundle, open_session
    from covid_cxr.lungs.crop import lung_only
    from covid_cxr.lungs.segment import LungSegmenter, sanity_check
    from covid_cxr.serve.repository import LoadedModel

    b = check_bundle(crop_classifier)
    assert b.metadata.lung_crop.mode == "mask" and (crop_classifier / "lungs" / "model.onnx").is_file()
    x = np.stack([draw_pair(np.random.default_rng(s))[0] for s in range(20, 24)]).astype(np.float32)
    seg = LungSegmenter.from_bundle(band_lungs)
    assert all(sanity_check(m).ok for m in seg.masks(x))  # every image really is cropped
    raw = open_session(b.onnx_path)
    want = raw.run(["probabilities"], {"image": lung_only(x, seg, "mask")[..., None]})[0]
    whole = raw.run(["probabilities"], {"image": x[..., None]})[0]
    got = b.predict(x)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.abs(got - whole).max() > 1e-4
    loaded = LoadedModel("cropped", 1, b, open_session(b.onnx_path))  # the server prepares, then runs
    served = loaded.run(loaded.prepare(x[..., None]))
    np.testing.assert_allclose(served[:, :3], want, atol=1e-6)


@SLOW_LUNGS
def test_bundle_check_refuses_a_lung_crop_bundle_without_its_own_lung_model(crop_classifier, tmp_path):
    import shutil

    from covid_cxr.bundle import BundleError, check_bundle

    copy = tmp_path / "cropped" / "1"
    shutil.copytree(crop_classifier, copy)
    onnx = copy / "lungs" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-1] + b"\0")
    with pytest.raises(BundleError, match="not the lung model this bundle was written with"):
        check_bundle(copy)
    onnx.unlink()
    with pytest.raises(BundleError, match="lungs/model.onnx: missing"):
        check_bundle(copy)


def test_source_balance_draws_the_small_source_more_often(tmp_path):
    """source_balance 1: every source equally often per epoch; 0: shuffled, each pair once."""
    from collections import Counter

    from covid_cxr.core.lung_config import LungConfig
    from covid_cxr.data.lung_masks import LungPairs
    from covid_cxr.train.lungs import source_weights, train_loader

    sources = ["q"] * 600 + ["c"] * 300 + ["v"] * 100
    n = len(sources)
    pairs = LungPairs(tmp_path, [str(i) for i in range(n)], sources, np.zeros((n, 8, 8), np.float32),
                      np.zeros((n, 8, 8), bool), list(range(n)))
    w = source_weights(sources, 1.0)
    assert np.allclose([w[np.array(sources) == s].sum() for s in "qcv"], w.sum() / 3)
    drawn = Counter(sources[i] for i in train_loader(pairs, LungConfig(source_balance=1.0)).sampler)
    assert sum(drawn.values()) == n and 0.28 < drawn["v"] / n < 0.39
    once = list(train_loader(pairs, LungConfig(source_balance=0.0)).sampler)
    assert sorted(once) == list(range(n))


def test_fast_mask_steps_match_the_reference_ones():
    """OpenCV's components and bilinear upsampling give what scipy.ndimage.label and PIL give."""
    from scipy import ndimage

    from covid_cxr.data.decode import resize
    from covid_cxr.lungs.segment import blobs, grow, two_largest

    rng = np.random.default_rng(6)
    for _ in range(5):
        mask = ndimage.binary_opening(rng.random((S, S)) > 0.6)
        labels, order = blobs(mask)
        ref, n = ndimage.label(mask, structure=np.ones((3, 3)))
        assert len(order) == n and len({(a, b) for a, b in zip(labels.ravel(), ref.ravel())}) == n + 1  # same blobs
        sizes = np.bincount(labels.ravel())[1:]
        assert list(sizes[np.array(order) - 1]) == sorted(sizes, reverse=True)
        ref_sizes = np.sort(np.bincount(ref.ravel())[1:])[::-1]
        if ref_sizes[1] != ref_sizes[2]:  # no tie for second place: the same two blobs kept
            keep = 1 + np.argsort(-np.bincount(ref.ravel())[1:], kind="stable")[:2]
            np.testing.assert_array_equal(two_largest(mask), np.isin(ref, keep))
    probs = rng.random((2, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(grow(probs, 40, 48), np.stack([resize(p, 40, 48) for p in probs]), atol=1e-5)


@SLOW_LUNGS
def test_serve_refuses_a_lung_crop_bundle_whose_lung_model_fails_its_sha256(crop_classifier, tmp_path):
    """Issue 17 item 9: the server verifies the embedded lung model as `bundle check` does; a
    tampered lungs/model.onnx makes that model unavailable (503, saying why), the intact one answers."""
    import shutil

    import requests

    from covid_cxr.serve.settings import ServeSettings
    from covid_cxr.serve.testing import running_server

    models = tmp_path / "models"
    shutil.copytree(crop_classifier, models / "good" / "1")
    shutil.copytree(crop_classifier, models / "tampered" / "1")
    onnx = models / "tampered" / "1" / "lungs" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"\0")  # still loads in ONNX Runtime; not the file recorded
    body = {"instances": [[[0.5] * S] * S]}
    with running_server(ServeSettings(models=models, rescan_seconds=0.2)) as base:
        assert requests.post(f"{base}/v1/models/good:predict", json=body).status_code == 200
        bad = requests.post(f"{base}/v1/models/tampered:predict", json=body)
        assert bad.status_code == 503, bad.text
        assert "not the lung model this bundle was written with" in bad.json()["error"]
