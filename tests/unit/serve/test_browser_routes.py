"""The in-browser mode's server side: the model description and model.onnx, on the tiny real bundle."""

from __future__ import annotations

import shutil

import pytest
import requests

from covid_cxr.bundle import load_bundle
from covid_cxr.serve.routes import browser
from covid_cxr.serve.settings import ServeSettings
from covid_cxr.serve.testing import running_server


@pytest.fixture
def models(tiny_models, tmp_path):
    out = tmp_path / "models"
    shutil.copytree(tiny_models / "tiny" / "1", out / "tiny" / "1")
    return out


@pytest.fixture
def with_runtime(tmp_path, monkeypatch):
    """A stand-in runtime folder (the real files come from `make web-runtime`; only their presence counts here)."""
    folder = tmp_path / "ort"
    folder.mkdir()
    for name in browser.RUNTIME_FILES:
        (folder / name).write_bytes(b"x")
    monkeypatch.setattr(browser, "RUNTIME_DIR", folder)
    return folder


def test_model_description_and_onnx_are_the_bundles(models, with_runtime):
    bundle = load_bundle(models / "tiny")
    with running_server(ServeSettings(models=models, max_image_pixels=1_000_000)) as url:
        spec = requests.get(f"{url}/api/v1/browser/model", timeout=30).json()
        assert spec["name"] == "tiny" and spec["version"] == 1 and spec["classes"] == bundle.classes
        assert (spec["height"], spec["width"]) == bundle.input_hw and spec["max_pixels"] == 1_000_000
        assert spec["gate"] == bundle.has_ood and spec["temperature"] == pytest.approx(bundle.temperature)
        assert spec["runtime_url"] == browser.RUNTIME_URL and spec["unavailable"] is None
        onnx = requests.get(f"{url}/{spec['onnx_url']}", timeout=30)
        assert onnx.status_code == 200 and onnx.content == bundle.onnx_path.read_bytes()
        # the same description when the model is named; refusals are 4xx JSON, never the file
        assert requests.get(f"{url}/api/v1/browser/model?model=tiny", timeout=30).json() == spec
        missing = requests.get(f"{url}/api/v1/browser/model?model=nope", timeout=30)
        assert missing.status_code == 404 and "error" in missing.json()
        for path, status in (("tiny/versions/2", 404), ("nope/versions/1", 404), ("tiny/versions/x", 400),
                             ("bad%20name/versions/1", 400)):
            r = requests.get(f"{url}/api/v1/browser/models/{path}/model.onnx", timeout=30)
            assert r.status_code == status and "error" in r.json(), path


def test_without_runtime_the_page_is_told_why(models, tmp_path, monkeypatch):
    monkeypatch.setattr(browser, "RUNTIME_DIR", tmp_path / "none")
    with running_server(ServeSettings(models=models)) as url:
        spec = requests.get(f"{url}/api/v1/browser/model", timeout=30).json()
    assert spec["runtime_url"] is None and "make web-runtime" in spec["unavailable"]


def test_api_key_guards_the_model_too(models, with_runtime):
    with running_server(ServeSettings(models=models, api_key="s3cret")) as url:
        assert requests.get(f"{url}/api/v1/browser/model", timeout=30).status_code == 401
        assert requests.get(f"{url}/api/v1/browser/models/tiny/versions/1/model.onnx", timeout=30).status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        spec = requests.get(f"{url}/api/v1/browser/model", headers=auth, timeout=30).json()
        assert requests.get(f"{url}/{spec['onnx_url']}", headers=auth, timeout=30).status_code == 200


def test_the_page_offers_both_modes_and_shows_dicom_in_pickers(models):
    with running_server(ServeSettings(models=models)) as url:
        page = requests.get(url + "/", timeout=30).text
        js = requests.get(url + "/static/ondevice.js", timeout=30)
    assert 'accept="image/*,.dcm,.dicom,application/dicom"' in page
    assert 'id="mode-device"' in page and "static/ondevice.js" in page
    assert js.status_code == 200 and "covidCxrOnDevice" in js.text


def test_a_lung_crop_model_is_refused_and_an_operating_point_travels(tiny_models, with_runtime):
    """model.onnx of a --lung-crop bundle expects lung-cropped input: the page must not run it alone."""
    from covid_cxr.bundle.reader import Bundle
    from covid_cxr.bundle.schema import LungCrop, OperatingPoint
    from covid_cxr.serve.repository import LoadedModel

    plain = load_bundle(tiny_models / "tiny")
    op = OperatingPoint(class_name=plain.classes[0], threshold=0.3, target_recall=0.95, val_recall=0.96, val_images=9)
    for crop, refused in ((None, False), (LungCrop.model_construct(mode="box"), True)):
        meta = plain.metadata.model_copy(update={"lung_crop": crop, "operating_point": op})
        spec = browser.describe(LoadedModel("tiny", 1, Bundle(plain.path, meta), session=None), ServeSettings(models=tiny_models))
        assert (spec.unavailable == browser.LUNG_CROP) is refused
        assert spec.operating_point.class_name == plain.classes[0] and spec.operating_point.threshold == 0.3
