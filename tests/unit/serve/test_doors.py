"""Issue 17, one inference path: the same real X-rays (and one noise picture) through every door -
offline predict, TF Serving REST, the Open Inference Protocol (real tritonclient, with and without
`outputs`), the upload API and the web page's call, evaluate, explain and audit - give identical
probabilities (within 1e-6), gate verdicts and labels, for a single model, an ensemble and a
lung-crop bundle; and v2 requests go through the micro-batcher (counted in /metrics).

Slow: it trains the tiny fixture bundles and reads ../shared/data. The per-door table is written
to test-artifacts/doors.json (docs/results/doors.md)."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from typer.testing import CliRunner

from covid_cxr.cli import app
from covid_cxr.serve.settings import ServeSettings
from covid_cxr.serve.testing import running_server
from tests.conftest import sample_images
from tests.unit.evaluate.test_accuracy_tools import op_models  # noqa: F401 (fixture: a second tiny bundle)
from tests.unit.lungs.test_lungs import band_lungs, crop_classifier, lung_data, lung_models  # noqa: F401 (fixtures)

httpclient = pytest.importorskip("tritonclient.http")
pytestmark = pytest.mark.slow
TOL = 1e-6
BUNDLES = ("tiny", "op", "ens", "cropped")  # single models (op: with an operating point), an ensemble, a lung crop
FOLDER_CLASS = {"COVID": "COVID-19", "Normal": "Normal", "Viral Pneumonia": "Viral Pneumonia"}


@pytest.fixture(scope="module")
def xrays(data_dir, tmp_path_factory) -> Path:
    """A labelled folder: two real X-rays per class and a noise picture filed under Normal."""
    root = tmp_path_factory.mktemp("doors") / "xrays"
    for folder, paths in sample_images(data_dir, 2).items():
        (root / folder).mkdir(parents=True)
        for p in paths:
            shutil.copy(p, root / folder / p.name)
    noise = np.random.default_rng(0).integers(0, 256, (299, 299), dtype=np.uint8)
    Image.fromarray(noise).save(root / "Normal" / "noise.png")
    return root


@pytest.fixture(scope="module")
def models(tiny_models, op_models, crop_classifier, tmp_path_factory) -> Path:  # noqa: F811
    from covid_cxr.publish.ensemble import build_ensemble

    out = tmp_path_factory.mktemp("doors-models") / "models"
    shutil.copytree(tiny_models / "tiny" / "1", out / "tiny" / "1")
    shutil.copytree(op_models / "op" / "1", out / "op" / "1")
    shutil.copytree(crop_classifier, out / "cropped" / "1")
    build_ensemble([tiny_models / "tiny", op_models / "op"], out, "ens")
    return out


@pytest.fixture(scope="module")
def server(models):
    with running_server(ServeSettings(models=models, rescan_seconds=1.0)) as url:
        yield url


def _files(xrays: Path) -> list[Path]:
    return sorted(xrays.rglob("*.png"))


def _offline(models: Path, name: str, files: list[Path]) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "predict.json"
        r = CliRunner().invoke(app, ["predict", *map(str, files), "--model", str(models / name), "--json", str(out)])
        assert r.exit_code == 0, r.output
        results = json.loads(out.read_text())["results"]
    return {Path(x["image"]).name: (x["probabilities"], x["label"], x["in_distribution"]) for x in results}


def _tf(server: str, name: str, f: Path, classes: list[str]) -> tuple:
    body = {"signature_name": "with_ood", "instances": [{"b64": base64.b64encode(f.read_bytes()).decode()}]}
    r = requests.post(f"{server}/v1/models/{name}:predict", json=body, timeout=60)
    assert r.status_code == 200, r.text
    p = r.json()["predictions"][0]
    return dict(zip(classes, p["probabilities"])), None, p["in_distribution"]


def _v2(client, name: str, f: Path, classes: list[str], hw, named: bool) -> tuple:
    """named: FP32 in JSON with every output asked for; else what tritonclient sends by default
    (BYTES, binary, no `outputs`)."""
    from covid_cxr.data.decode import load_for_model

    if named:
        x = load_for_model(f, *hw)[None, :, :, None]
        inp = httpclient.InferInput("image", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=False)
        outs = [httpclient.InferRequestedOutput(n, binary_data=False)
                for n in ("probabilities", "ood_score", "in_distribution")]
        res = client.infer(name, [inp], outputs=outs)
    else:
        inp = httpclient.InferInput("image", [1], "BYTES")
        inp.set_data_from_numpy(np.array([f.read_bytes()], dtype=object))
        res = client.infer(name, [inp])
    return dict(zip(classes, res.as_numpy("probabilities")[0].tolist())), None, bool(res.as_numpy("in_distribution")[0])


def _upload(server: str, name: str, f: Path, web: bool) -> tuple:
    """The upload API; `web`: the call the web page makes (Grad-CAM on)."""
    params = {"model": name, **({"gradcam": "true"} if web else {})}
    r = requests.post(f"{server}/api/v1/predict", params=params, timeout=120,
                      files={"file": (f.name, f.read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    j = r.json()
    assert (j.get("warning") is not None) == (j["in_distribution"] is False)
    assert not web or j.get("gradcam_png")
    return j["probabilities"], j.get("label"), j["in_distribution"]  # no label when the gate rejects


def _evaluate(models: Path, name: str, xrays: Path, out: Path) -> dict:
    import csv

    from covid_cxr.bundle import load_bundle
    from covid_cxr.evaluate.external import evaluate_folder

    b = load_bundle(models / name)
    evaluate_folder(b, xrays, out, progress=False)
    with (out / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    return {Path(r["image"]).name: ({c: float(r[c]) for c in b.classes}, r["label"] or None, r["in_distribution"] == "True")
            for r in rows}


def _explain(models: Path, name: str, files: list[Path]) -> dict:
    from covid_cxr.bundle import load_bundle
    from covid_cxr.data.decode import load_for_model
    from covid_cxr.explain.gradcam import explainer_for_bundle
    from covid_cxr.explain.run import explain_image

    b = load_bundle(models / name)
    ex = explainer_for_bundle(b)
    out = {}
    for f in files:
        r = explain_image(b, ex, load_for_model(f, *b.input_hw)).row(b.classes)
        out[f.name] = (r["probabilities"], r["label"], r["in_distribution"])
    return out


def _doors(models, server, xrays, tmp_path) -> dict[str, dict[str, dict]]:
    """bundle -> door -> image -> (probabilities by class, label or None, in_distribution)."""
    from covid_cxr.bundle import load_bundle

    files = _files(xrays)
    client = httpclient.InferenceServerClient(url=server.removeprefix("http://"))
    found = {}
    try:
        for name in BUNDLES:
            b = load_bundle(models / name)
            cls, hw = b.classes, b.input_hw
            found[name] = {
                "predict": _offline(models, name, files),
                "tf-serving": {f.name: _tf(server, name, f, cls) for f in files},
                "v2 (no outputs)": {f.name: _v2(client, name, f, cls, hw, False) for f in files},
                "v2 (outputs)": {f.name: _v2(client, name, f, cls, hw, True) for f in files},
                "upload": {f.name: _upload(server, name, f, False) for f in files},
                "web": {f.name: _upload(server, name, f, True) for f in files},
                "evaluate": _evaluate(models, name, xrays, tmp_path / f"eval-{name}"),
                "explain": _explain(models, name, files),
            }
    finally:
        client.close()
    return found


def _table(found: dict) -> dict:
    """Per bundle and door: the largest probability difference to offline predict, and how many
    labels / gate verdicts differ."""
    table = {}
    for name, doors in found.items():
        ref = doors["predict"]
        for door, answers in doors.items():
            dp = max(abs(answers[k][0][c] - ref[k][0][c]) for k in ref for c in ref[k][0])
            labels = sum(answers[k][1] is not None and answers[k][1] != ref[k][1] for k in ref)
            gates = sum(answers[k][2] != ref[k][2] for k in ref)
            table[f"{name} / {door}"] = {"max_abs_dp": float(dp), "label_diffs": labels, "gate_diffs": gates}
    return table


def test_every_door_gives_the_same_answer(models, server, xrays, tmp_path, artifacts_dir):
    found = _doors(models, server, xrays, tmp_path)
    table = _table(found)
    (artifacts_dir / "doors.json").write_text(json.dumps(table, indent=1))
    bad = {k: v for k, v in table.items() if v["max_abs_dp"] > TOL or v["label_diffs"] or v["gate_diffs"]}
    assert not bad, json.dumps(bad, indent=1)
    for name in BUNDLES:  # the doors can disagree: the images differ, and the noise is refused by the gate
        ref = found[name]["predict"]
        assert len(ref) == 7 and ref["noise.png"][2] is False
        assert len({tuple(np.round(list(v[0].values()), 4)) for v in ref.values()}) > 1
    # the lung crop really changes what the cropped bundle answers (else this test could not see it skipped)
    from covid_cxr.bundle import load_bundle
    from covid_cxr.data.decode import load_for_model

    b = load_bundle(models / "cropped")
    x = np.stack([load_for_model(f, *b.input_hw) for f in _files(xrays)])[..., None]
    raw = b.session().run(["probabilities"], {"image": x})[0]
    assert np.abs(raw - b.predict(x[..., 0])).max() > 1e-3


def _batched_images(server: str, name: str) -> float:
    text = requests.get(f"{server}/metrics", timeout=30).text
    m = re.search(rf'covid_cxr_batch_size_sum{{model="{name}",version="1"}} ([0-9.e+]+)', text)
    return float(m.group(1)) if m else 0.0


def test_v2_infers_go_through_the_batcher_and_are_counted(models, server, xrays):
    """v2 with or without `outputs` runs in the micro-batcher, as TF Serving's predict: every image
    is counted in covid_cxr_batch_size (before issue 17, v2 without outputs was not: 0 batches)."""
    from covid_cxr.bundle import load_bundle

    b = load_bundle(models / "tiny")
    f = _files(xrays)[0]
    client = httpclient.InferenceServerClient(url=server.removeprefix("http://"))
    try:
        before = _batched_images(server, "tiny")
        for named in (False, True, False):
            _v2(client, "tiny", f, b.classes, b.input_hw, named)
    finally:
        client.close()
    assert _batched_images(server, "tiny") - before == 3


def test_explain_prints_the_calibrated_probability_and_the_gate(models, xrays, tmp_path):
    """Noise: explain's table shows predict's probability and the gate's NO, never an uncalibrated
    Grad-CAM softmax without a warning."""
    noise = xrays / "Normal" / "noise.png"
    ref = _offline(models, "tiny", [noise])["noise.png"]
    r = CliRunner().invoke(app, ["explain", str(noise), "--model", str(models / "tiny"), "--out",
                                 str(tmp_path / "cam"), "--no-progress"], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    probs, label, inside = ref
    assert inside is False and label is None  # predict: rejected, no label
    explained = max(probs, key=probs.get)  # tiny has no operating point: the map explains the argmax
    assert explained in text and f"{probs[explained]:.3f}" in text  # predict's calibrated probability
    assert "NO: unlike the training X-rays" in text
    assert (tmp_path / "cam" / "noise_cam.npy").is_file() and (tmp_path / "cam" / "noise_cam.png").is_file()


def test_audit_decides_as_predict(models, xrays, tmp_path):
    """The audit's full-image accuracy is that of predict's labels on the same images (the bundle's
    lung crop and operating point, not a bare argmax)."""
    from covid_cxr.bundle import load_bundle
    from covid_cxr.trust.audit import run_audit

    for name in ("op", "cropped"):
        b = load_bundle(models / name)
        res = run_audit(b, xrays, tmp_path / f"audit-{name}", per_class=3, cam_per_class=0)
        got = res["probes"]["occlusion"]["accuracy"]["full image"]["accuracy"]
        ref = _offline(models, name, _files(xrays))
        truth = {f.name: FOLDER_CLASS[f.parent.name] for f in _files(xrays)}
        decided = {k: b.classes[int(b.decide(np.array([list(ref[k][0].values())]))[0])] for k in ref}  # gate aside
        want = np.mean([decided[k] == truth[k] for k in ref])
        assert res["sample"]["n"] == 7 and got == pytest.approx(want)
