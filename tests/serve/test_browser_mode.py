"""The web page's in-browser mode in real chromium: the same answers as the server, the image never sent.

Same files both ways (real X-ray PNGs, a colour JPEG, a noise picture, a large RGB picture that takes
decode.py's box reduce): the browser's probabilities equal the upload API's within 1e-4 and the gate agrees; a
rejected image shows no label; DICOM and non-images are refused with a reason; every request stays
on our own server (no CDN) and none carries the image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from covid_cxr.serve.routes import browser as browser_routes
from covid_cxr.serve.settings import ServeSettings
from covid_cxr.serve.testing import running_server
from tests.conftest import sample_images
from tests.serve.test_web import ARGS, CHROMIUM

TOLERANCE = 1e-4

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium "
                       "(apt-get install chromium)"),
    pytest.mark.skipif(not browser_routes.runtime_present(), reason="onnxruntime-web is not in serve/static/vendor "
                       "(run `make web-runtime`: it fetches it with npm)"),
]


def _pictures(data_dir: Path, out: Path) -> list[Path]:
    """Six real X-rays, a tinted colour JPEG of one, uniform noise, and a 1401 x 1503 tinted RGB
    enlargement (box reduce k=2, odd edges)."""
    files = [p for ps in sample_images(data_dir, per_class=2).values() for p in ps]
    rng = np.random.default_rng(0)
    noise = out / "noise.png"
    Image.fromarray(rng.integers(0, 256, (299, 299, 3), dtype=np.uint8)).save(noise)
    big = out / "large-rgb.png"
    rgb = Image.open(files[0]).convert("RGB").resize((1401, 1503), Image.Resampling.BICUBIC)
    tint = np.asarray(rgb, dtype=np.int16) + np.array([12, -5, 3], dtype=np.int16)
    Image.fromarray(np.clip(tint, 0, 255).astype(np.uint8)).save(big)
    colour = out / "tinted.jpg"  # luma from the JPEG's own Y plane (1.3e-4 off when recomputed from RGB)
    tinted = np.asarray(Image.open(files[1]).convert("RGB"), dtype=np.int16) + np.array([12, -5, 3], dtype=np.int16)
    Image.fromarray(np.clip(tinted, 0, 255).astype(np.uint8)).save(colour, quality=90)
    return [*files, colour, noise, big]


def _server_answers(base: str, files: list[Path]) -> dict[str, dict]:
    out = {}
    for f in files:
        r = requests.post(base + "/api/v1/predict", files={"file": (f.name, f.read_bytes(), "image/png")}, timeout=120)
        assert r.status_code == 200, r.text
        out[f.name] = r.json()
    return out


def _browser_answer(page, file: Path) -> dict:
    page.evaluate("delete document.getElementById('result').dataset.answer")
    page.locator("#file").set_input_files(str(file))
    page.wait_for_function("document.getElementById('result').dataset.answer || "
                           "document.getElementById('status').classList.contains('error')", timeout=120_000)
    raw = page.locator("#result").get_attribute("data-answer")
    assert raw, page.locator("#status").inner_text()
    return {**json.loads(raw), "shown_label": page.get_by_test_id("label").inner_text(),
            "warning_shown": page.get_by_test_id("ood-warning").is_visible()}


def _operating_point_applies(page, xray: Path, answer: dict, tmp_path: Path) -> dict:
    """The bundle's operating point, as schema.decide applies it: the fixture model has none, so the
    page is given one (threshold 0 on the least likely class) and must then answer that class."""
    probs = answer["probabilities"]
    wanted = min(probs, key=probs.get)
    assert answer["label"] != wanted

    def with_operating_point(route):
        spec = route.fetch().json()
        spec["operating_point"] = {"class_name": wanted, "threshold": 0.0}
        route.fulfill(json=spec)

    page.route("**/api/v1/browser/model*", with_operating_point)
    again = tmp_path / ("again-" + xray.name)  # another name: choosing the same file again fires no change
    again.write_bytes(xray.read_bytes())
    try:
        return {**_browser_answer(page, again), "wanted": wanted}
    finally:
        page.unroute("**/api/v1/browser/model*")


def _refusal(page, file: Path) -> str:
    page.locator("#file").set_input_files(str(file))
    page.wait_for_function("document.getElementById('status').classList.contains('error')", timeout=60_000)
    assert page.locator("#result").is_hidden()
    return page.locator("#status").inner_text()


def test_browser_mode_answers_as_the_server_without_sending_the_image(models_dir, data_dir, tmp_path, artifacts_dir):
    from playwright.sync_api import sync_playwright

    files = _pictures(data_dir, tmp_path)
    with running_server(ServeSettings(models=models_dir)) as base, sync_playwright() as pw:
        server = _server_answers(base, files)
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            page = chromium.new_page()
            requested = []
            page.on("request", lambda r: requested.append((r.method, r.url)))
            page.goto(base + "/")
            page.locator("#mode-device").check()
            assert "DICOM is not read in the browser" in page.get_by_test_id("mode-note").inner_text()
            device = {f.name: _browser_answer(page, f) for f in files}
            xray = next(f for f in files if device[f.name].get("in_distribution") is not False)
            forced = _operating_point_applies(page, xray, device[xray.name], tmp_path)
            (tmp_path / "x.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
            (tmp_path / "notes.png").write_bytes(b"not an image at all")
            dicom, junk = _refusal(page, tmp_path / "x.dcm"), _refusal(page, tmp_path / "notes.png")
        finally:
            chromium.close()

    rows = _compare(server, device)
    (artifacts_dir / "browser_parity.json").write_text(json.dumps(rows, indent=1))
    assert forced["label"] == forced["wanted"], forced
    assert "server mode" in dicom and "not a PNG or JPEG" in junk, (dicom, junk)
    outside = [u for _, u in requested if not u.startswith((base, "blob:" + base))]  # blob: the local preview
    assert not outside, outside
    assert not [u for m, u in requested if m != "GET"], "in-browser mode sent something to the server"
    assert any(r["server_in_distribution"] for r in rows), "the fixture model's gate accepted no X-ray"
    assert not rows[-2]["server_in_distribution"], "the gate should reject uniform noise"


def _compare(server: dict[str, dict], device: dict[str, dict]) -> list[dict]:
    rows = []
    for name, s in server.items():
        d = device[name]
        diff = max(abs(s["probabilities"][c] - d["probabilities"][c]) for c in s["probabilities"])
        rows.append({"image": name, "max_abs_diff": diff, "server_in_distribution": s.get("in_distribution"),
                     "browser_in_distribution": d.get("in_distribution"),
                     "ood_score_diff": abs(s.get("ood_score", 0.0) - d.get("ood_score", 0.0))})
        assert diff <= TOLERANCE, (name, s["probabilities"], d["probabilities"])
        assert d.get("in_distribution") == s.get("in_distribution"), name
        if s.get("in_distribution") is False:  # rejected: no label anywhere on the page
            assert d["label"] is None and d["shown_label"].startswith("none") and d["warning_shown"], name
        else:
            assert d["label"] == s["label"] == d["shown_label"] and not d["warning_shown"], name
    return rows
