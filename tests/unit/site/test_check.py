"""`covid-cxr site check` on the tiny real bundle: the reference it carries, fit vs shifted folders,
the exit codes, and a bundle written before the reference existed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from covid_cxr.bundle import load_bundle
from covid_cxr.cli import app
from covid_cxr.site.images import image_files, pixel_stats

runner = CliRunner()


def _invoke(*args: str):
    return runner.invoke(app, ["site", "check", *args])


@pytest.fixture(scope="module")
def darkened(tiny_data, tmp_path_factory) -> Path:
    """Every tiny image darkened (gamma 3) and padded with a black frame, unlabelled, in one folder."""
    out = tmp_path_factory.mktemp("dark-site")
    for i, p in enumerate(image_files(tiny_data)):
        x = np.asarray(Image.open(p).convert("L"), np.float32) / 255
        x = np.pad(x ** 3, 16)
        Image.fromarray((x * 255).astype(np.uint8)).save(out / f"{i}.png")
    return out


def test_the_bundle_carries_its_reference(tiny_models):
    b = load_bundle(tiny_models / "tiny")
    ref = b.metadata.site_reference
    val = b.metadata.training.data.counts["val"]
    assert ref is not None and ref.n == sum(val.values())
    assert set(ref.predicted) <= set(b.classes) and sum(ref.predicted.values()) == ref.n
    assert len(ref.ood_score) == len(ref.confidence) == len(ref.images.brightness) == ref.n
    assert ref.images.bit_depth == {"8": ref.n}


def test_the_same_collection_is_fit(tiny_models, tiny_data, tmp_path):
    r = _invoke("--model", str(tiny_models / "tiny"), "--data", str(tiny_data), "--json", str(tmp_path / "r.json"),
                "--out", str(tmp_path / "rep"), "--fail-on-shift")
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["verdict"] == "fit" and data["n"] == 36 and data["correction"] == "Holm"
    assert (tmp_path / "rep" / "shift.png").stat().st_size > 1000
    assert "Nothing to adapt" in (tmp_path / "rep" / "report.md").read_text()


def test_a_darkened_padded_site_is_flagged_and_fails_the_pipeline(tiny_models, darkened, tmp_path):
    r = _invoke("--model", str(tiny_models / "tiny"), "--data", str(darkened), "--out", str(tmp_path / "rep"),
                "--fail-on-shift")
    assert r.exit_code == 3 and "shift detected" in r.output, r.output  # the report is written all the same
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "darker" in report and "--init-from" in report and "20 images per class" in report
    assert "--name tiny-site" in report and "--model " + str(tiny_models / "tiny-site") in report
    assert f"--site-unlabelled {darkened}" in report  # its 36 films give the site's prevalence
    assert "fine-tuned on chest X-rays adapts better" in report  # the tiny bundle's backbone is frozen
    twelve = tmp_path / "twelve"  # enough to see the shift, too few to estimate a prevalence on
    twelve.mkdir()
    for p in image_files(darkened)[:12]:
        shutil.copy(p, twelve / p.name)
    r = _invoke("--model", str(tiny_models / "tiny"), "--data", str(twelve), "--out", str(tmp_path / "rep12"))
    report = (tmp_path / "rep12" / "report.md").read_text()
    assert r.exit_code == 0 and "shift detected" in r.output  # without --fail-on-shift a shift is no failure
    assert "--init-from" in report and "--site-unlabelled" not in report


def test_too_few_images_and_bad_input(tiny_models, darkened, tmp_path):
    few = tmp_path / "few"
    few.mkdir()
    for p in image_files(darkened)[:3]:
        shutil.copy(p, few / p.name)
    (few / "broken.png").write_bytes(b"not a png")
    r = _invoke("--model", str(tiny_models / "tiny"), "--data", str(few), "--json", str(tmp_path / "f.json"),
                "--fail-on-shift")
    assert r.exit_code == 0 and "too few images" in r.output
    assert len(json.loads((tmp_path / "f.json").read_text())["skipped"]) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _invoke("--model", str(tiny_models / "tiny"), "--data", str(empty))
    assert r.exit_code == 2 and "error:" in r.output and "no image files" in r.output
    r = _invoke("--model", str(tiny_models / "tiny"), "--data", str(few), "--alpha", "1.5")
    assert r.exit_code == 2 and "--alpha" in r.output


def test_a_bundle_without_a_reference_loads_and_says_why_it_cannot_check(bundle_copy, tiny_data):
    meta = json.loads((bundle_copy / "metadata.json").read_text())
    meta.pop("site_reference")
    (bundle_copy / "metadata.json").write_text(json.dumps(meta))
    assert load_bundle(bundle_copy).metadata.site_reference is None
    r = _invoke("--model", str(bundle_copy), "--data", str(tiny_data))
    assert r.exit_code == 2 and "no site_reference" in r.output
    meta["site_reference"] = {"n": 1, "confidence": [1.0], "predicted": {"Cat": 1}}
    (bundle_copy / "metadata.json").write_text(json.dumps(meta))
    r = _invoke("--model", str(bundle_copy), "--data", str(tiny_data))
    assert r.exit_code == 2 and "site_reference" in r.output


def test_pixel_statistics_see_darkening_blur_and_padding():
    rng = np.random.default_rng(0)
    x = rng.random((64, 64)).astype(np.float32)
    base = pixel_stats(x)
    assert pixel_stats(x ** 3)["brightness"] < base["brightness"]
    blurred = (x[:-1, :-1] + x[1:, :-1] + x[:-1, 1:] + x[1:, 1:]) / 4
    assert pixel_stats(blurred)["sharpness"] < base["sharpness"]
    assert pixel_stats(np.pad(x, 8))["border"] < 0.1 < base["border"]


def test_the_next_step_adapts_a_fine_tuned_bundle_as_it_is(bundle_copy):
    from covid_cxr.site.check import adapt_target

    frozen = load_bundle(bundle_copy)
    start, note = adapt_target(frozen)
    assert start == str(bundle_copy.parent) and "frozen" in note and "--recipe accurate" in note
    meta = json.loads((bundle_copy / "metadata.json").read_text())
    meta["architecture"]["frozen_backbone"] = False
    (bundle_copy / "metadata.json").write_text(json.dumps(meta))
    assert adapt_target(load_bundle(bundle_copy)) == (str(bundle_copy.parent), "")
