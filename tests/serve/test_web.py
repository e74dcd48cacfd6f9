"""The web page in a real headless browser (Debian's chromium driven by Playwright; nothing installed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from covid_cxr.serve.settings import ServeSettings
from covid_cxr.serve.testing import running_server

CHROMIUM = Path("/usr/bin/chromium")
CLASSES = ["COVID-19", "Normal", "Viral Pneumonia"]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium "
                    "(apt-get install chromium); the browser test needs it and installs nothing itself")
@pytest.mark.parametrize("viewport", [{"width": 390, "height": 844}], ids=["phone"])
def test_upload_in_browser_shows_label_bars_and_overlay(models_dir, data_dir, artifacts_dir, viewport):
    from playwright.sync_api import expect, sync_playwright

    xray = _accepted_xray(models_dir, data_dir)
    with running_server(ServeSettings(models=models_dir)) as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport=viewport)
            page.goto(base + "/")
            expect(page.get_by_text("research use only, not for clinical diagnosis").first).to_be_visible()
            picker = page.locator("input[type=file]")
            assert picker.get_attribute("accept") == "image/*"
            assert picker.get_attribute("capture") == "environment"

            picker.set_input_files(str(xray))
            label = page.get_by_test_id("label")
            expect(label).not_to_be_empty(timeout=60_000)
            assert label.inner_text() in CLASSES
            bars = page.locator("#bars .bar")
            expect(bars).to_have_count(3)
            assert [b.get_attribute("data-class") for b in bars.all()] == CLASSES
            widths = [float(b.locator("[role=meter]").get_attribute("aria-valuenow")) for b in bars.all()]
            assert abs(sum(widths) - 1) < 1e-3
            if importlib.util.find_spec("covid_cxr.explain.gradcam") is not None:
                expect(page.locator("#overlay")).to_be_visible(timeout=60_000)
                assert page.evaluate("document.getElementById('overlay').naturalWidth") == 224
            else:  # Grad-CAM is written separately: the page says why the overlay is missing
                expect(page.locator("#overlay-note")).to_contain_text("Grad-CAM unavailable")
            page.screenshot(path=str(artifacts_dir / "web.png"), full_page=True)
        finally:
            browser.close()
    assert (artifacts_dir / "web.png").stat().st_size > 10_000


def _accepted_xray(models_dir, data_dir):
    """A COVID-19 X-ray the fixture model's out-of-distribution gate accepts (a model trained on 40
    images per class rejects some real X-rays too; the page then shows a warning, tested in unit tests)."""
    from covid_cxr.bundle import load_bundle
    from covid_cxr.data.decode import load_batch

    b = load_bundle(models_dir / "efficientnet_lite0")
    files = sorted((data_dir / "COVID").glob("*.png"))[:20]
    _, _, inside = b.predict_with_ood(load_batch(files, *b.input_hw))
    return files[0] if inside is None else files[int(inside.argmax())]
