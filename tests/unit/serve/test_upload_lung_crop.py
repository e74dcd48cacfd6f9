"""A Grad-CAM upload to a lung-crop bundle crops the lungs once: the classifier's prepared pixels go
on to Grad-CAM, whose picture is the one computed from scratch."""

from __future__ import annotations

import base64
import shutil

import numpy as np
import pytest
import requests
from PIL import Image

from covid_cxr.bundle import load_bundle
from covid_cxr.bundle.reader import Bundle
from covid_cxr.serve.settings import ServeSettings
from covid_cxr.serve.testing import running_server
from tests.unit.lungs.test_lungs import band_lungs, crop_classifier, draw_pair, lung_data, lung_models  # noqa: F401


@pytest.mark.slow  # needs crop_classifier: a lung U-Net and a lung-crop classifier trained for the module
def test_a_gradcam_upload_crops_the_lungs_once(crop_classifier, tmp_path, monkeypatch):  # noqa: F811
    from covid_cxr.data.decode import load_for_model
    from covid_cxr.explain.render import cam_overlay

    models = tmp_path / "models"
    shutil.copytree(crop_classifier, models / "cropped" / "1")
    b = load_bundle(models / "cropped")
    if b.metadata.cam is None:
        pytest.skip("this bundle has no cam.onnx")
    image = tmp_path / "x.png"
    Image.fromarray((draw_pair(np.random.default_rng(30))[0] * 255).astype(np.uint8)).save(image)
    crops = []
    real_prepare = Bundle.prepare

    def counted(self, images):
        if self.metadata.lung_crop is not None:
            crops.append(len(images))
        return real_prepare(self, images)

    monkeypatch.setattr(Bundle, "prepare", counted)
    with running_server(ServeSettings(models=models)) as url:
        post = lambda gradcam: requests.post(f"{url}/api/v1/predict", params={"gradcam": gradcam},  # noqa: E731
                                             files={"file": ("x.png", image.read_bytes(), "image/png")}, timeout=60)
        assert post("false").status_code == 200  # loads (and warms) the model
        crops.clear()
        r = post("true")
        assert r.status_code == 200 and "gradcam_png" in r.json(), r.text
        assert crops == [1], crops  # was [1, 1]: the batcher's crop, then Grad-CAM's own
        crops.clear()
        assert post("false").status_code == 200 and crops == [1]  # without Grad-CAM: once, as before
    probs = np.array([[r.json()["probabilities"][c] for c in b.classes]])
    pixels = load_for_model(image.read_bytes(), *b.input_hw)
    png, _ = cam_overlay(b, pixels, int(b.decide(probs)[0]), spinning=False)  # from scratch: crops again
    assert base64.b64decode(r.json()["gradcam_png"]) == png  # the other side: the same picture
