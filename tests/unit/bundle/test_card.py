"""The model card: written into every new bundle, refreshed by `covid-cxr card`, served at the
model's route; real figures from the bundle, "not measured" where the bundle lacks a part."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import requests
from typer.testing import CliRunner

from covid_cxr.bundle import load_bundle
from covid_cxr.bundle.card import CARD_HTML, CARD_MD, NOT_MEASURED, card_markdown, reproduce_command
from covid_cxr.cli import app

SECTIONS = ("## Intended use", "## Out-of-scope use", "## Training data", "### Known shortcuts", "## Evaluation",
            "### Operating point", "## Calibration", "## Out-of-distribution gate", "## Shortcut audit",
            "## Lung fields and zones", "## Limitations", "## How to reproduce")


def test_new_bundle_has_a_card_with_every_section_and_its_real_figures(tiny_models):
    b = load_bundle(tiny_models / "tiny")
    md = (b.path / CARD_MD).read_text()
    html = (b.path / CARD_HTML).read_text()
    for heading in SECTIONS:
        assert heading in md, heading
    m, t = b.metadata, b.metadata.test_metrics
    assert f"accuracy **{t.accuracy:.3f}** (95% CI {t.accuracy_ci95[0]:.3f}–{t.accuracy_ci95[1]:.3f})" in md
    assert f"T = {m.trust.calibration.temperature:.3f}" in md
    assert f"exceeds {m.trust.ood.threshold:.4g}" in md and f"{100 * m.trust.ood.val_accept_rate:.1f}%" in md
    assert "paediatric collection" in md  # the database's known shortcut, named where Viral Pneumonia is a class
    assert reproduce_command(m) in md and "--image-size 64" in md and "--weights none" in md
    commit = m.software.get("covid-cxr commit")
    assert commit and f"commit `{commit}`" in md  # the tests run from a git checkout
    assert "Verdict: not measured" in md  # no audit in report/ yet
    assert "<table>" in html and "<h2>Calibration</h2>" in html and "<script" not in html


def test_card_of_a_bundle_without_its_optional_parts_says_not_measured(bundle_copy):
    raw = json.loads((bundle_copy / "metadata.json").read_text())
    raw.update(trust=None, test_metrics=None, training=None)
    (bundle_copy / "metadata.json").write_text(json.dumps(raw))
    shutil.rmtree(bundle_copy / "report")
    md = card_markdown(bundle_copy, load_bundle(bundle_copy).metadata)
    for heading in SECTIONS:
        if heading != "### Operating point":  # part of the evaluation, which is absent
            assert heading in md, heading
    assert f"Test metrics: {NOT_MEASURED}" in md and f"Gate: {NOT_MEASURED}" in md
    assert f"Temperature scaling: {NOT_MEASURED}" in md and f"Training command: {NOT_MEASURED}" in md
    assert "paediatric collection" in md  # the database's shortcut does not depend on the training record


def test_audit_in_report_reaches_the_card_and_raw_html_is_escaped(bundle_copy):
    audit = {"shortcut_suspected": True, "data": "/somewhere/covid19-radiography", "sample": {"n": 90},
             "lung_fields": {"method": "segmentation (lungs v1)"},
             "probes": {"occlusion": {"verdict": "lungs hidden keep 80% <script>alert(1)</script>"},
                        "gradcam": {"verdict": "low", "chance": 0.31,
                                    "mass_in_lungs": {"COVID-19": {"mean": 0.42}, "Normal": {"mean": 0.18}}}}}
    (bundle_copy / "report" / "audit.json").write_text(json.dumps(audit))
    res = CliRunner().invoke(app, ["card", str(bundle_copy.parent)])
    assert res.exit_code == 0, res.output
    md = (bundle_copy / CARD_MD).read_text()
    assert "Verdict: **shortcut suspected** (on `covid19-radiography`, 90 images)" in md
    assert "COVID-19 0.42, Normal 0.18; a uniform map would give 0.31" in md
    html = (bundle_copy / CARD_HTML).read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_card_command_refuses_what_is_not_a_bundle(tmp_path):
    res = subprocess.run([sys.executable, "-m", "covid_cxr", "card", str(tmp_path / "nope")], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and len(res.stderr.splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_served_card_html_markdown_and_errors(tiny_models, tmp_path):
    from covid_cxr.serve.settings import ServeSettings
    from covid_cxr.serve.testing import running_server

    models = tmp_path / "models"
    shutil.copytree(tiny_models / "tiny" / "1", models / "tiny" / "1")
    shutil.copytree(tiny_models / "tiny" / "1", models / "tiny" / "2")
    (models / "tiny" / "2" / CARD_MD).unlink()  # an older bundle, written before cards: rendered on request
    (models / "tiny" / "2" / CARD_HTML).unlink()
    with running_server(ServeSettings(models=models, rescan_seconds=0.2)) as url:
        page = requests.get(f"{url}/api/v1/models/tiny/card", timeout=10)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "<h1>Model card: tiny v1</h1>" in page.text  # v2's metadata still says version 1 (a copy)
        assert "default-src 'none'" in page.headers["content-security-policy"]  # a document, never a script host
        md = requests.get(f"{url}/api/v1/models/tiny/card?format=md&version=1", timeout=10)
        assert md.status_code == 200 and md.text == (models / "tiny" / "1" / CARD_MD).read_text()
        assert "Model card" in requests.get(url, timeout=10).text  # the web page links it
        for path, status in (("nope/card", 404), ("tiny/card?version=9", 404), ("tiny/card?format=pdf", 400),
                             ("tiny/card?version=0", 400), ("bad..name/card", 400)):
            r = requests.get(f"{url}/api/v1/models/{path}", timeout=10)
            assert r.status_code == status and "error" in r.json(), (path, r.status_code, r.text[:200])


def test_the_served_card_needs_the_key_where_metadata_does(tiny_models, tmp_path):
    """Under --api-key (scope 'all') the card, which carries test metrics, asks for the key as the
    metadata route does; with the key, or under scope 'predict', it is served."""
    from covid_cxr.serve.settings import ServeSettings
    from covid_cxr.serve.testing import running_server

    models = tmp_path / "models"
    shutil.copytree(tiny_models / "tiny" / "1", models / "tiny" / "1")
    key = {"Authorization": "Bearer k3y"}
    with running_server(ServeSettings(models=models, api_key="k3y")) as url:
        assert requests.get(f"{url}/api/v1/models/tiny/card", timeout=10).status_code == 401
        assert requests.get(f"{url}/api/v1/models/tiny/card", headers=key, timeout=10).status_code == 200
    with running_server(ServeSettings(models=models, api_key="k3y", api_key_scope="predict")) as url:
        assert requests.get(f"{url}/api/v1/models/tiny/card", timeout=10).status_code == 200
