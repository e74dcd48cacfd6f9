"""The typed bundle contract: round trip, JSON Schema file, format 1, and `bundle check` on every
kind of broken bundle (exit 2 and one line naming the file, never a traceback)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from covid_cxr.bundle import BundleError, BundleMetadata, check_bundle, load_bundle
from covid_cxr.bundle.schema import BundleContent, json_schema
from covid_cxr.cli import app
from covid_cxr.models.loading import load_torch

REPO = Path(__file__).resolve().parents[3]
FIXTURES = Path(__file__).parent / "fixtures"
runner = CliRunner()


def test_round_trip(tiny_models):
    b = check_bundle(tiny_models / "tiny")
    raw = json.loads((b.path / "metadata.json").read_text())
    assert BundleMetadata.model_validate(raw) == b.metadata
    assert b.metadata.format_version == 2 and b.version == 1 and b.input_hw == (64, 64)
    assert b.metadata.training.config.weights == "none"
    assert set(b.metadata.training.timings_s) >= {"data", "features", "train", "evaluate", "bundle", "total"}
    probs = b.predict(np.full((2, 64, 64), 0.5, np.float32))
    assert probs.shape == (2, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_input_spec_comes_from_the_decode_module(tiny_models):
    from covid_cxr.data import decode

    spec = load_bundle(tiny_models / "tiny").metadata.input
    assert (spec.resize, spec.color, spec.channels) == (decode.RESIZE_METHOD, decode.COLOR, decode.CHANNELS)
    assert tuple(spec.value_range) == decode.VALUE_RANGE


def test_schema_file_is_current():
    committed = (REPO / "docs" / "bundle.schema.json").read_text()
    assert committed == json_schema(), "run: covid-cxr bundle schema > docs/bundle.schema.json"


def test_format1_bundle_loads_and_evaluates(bundle_copy, tiny_data, tmp_path):
    """A bundle written by the first release (format 1, fixture from that code) is upgraded on read."""
    from covid_cxr.evaluate.external import evaluate_folder

    shutil.copy(FIXTURES / "format1-metadata.json", bundle_copy / "metadata.json")
    b = check_bundle(bundle_copy)
    assert b.metadata.format_version == 2 and b.format_on_disk == 1  # read as format 2
    assert b.metadata.training.history.epochs_run >= 1 and b.metadata.test_metrics.n > 0
    assert b.metadata.onnx.opset is None  # format 1 did not record it
    m = evaluate_folder(b, tiny_data, tmp_path / "report", progress=False)
    assert m.n == 36 and 0 <= m.accuracy <= 1


def _break(path: Path, how: str) -> None:
    meta = path / "metadata.json"
    if how == "truncated metadata.json":
        meta.write_text(meta.read_text()[:200])
    elif how == "missing key":
        raw = json.loads(meta.read_text())
        del raw["architecture"]["cam_layer"]
        meta.write_text(json.dumps(raw))
    elif how == "wrong format_version":
        raw = json.loads(meta.read_text())
        raw["format_version"] = 7
        meta.write_text(json.dumps(raw))
    elif how == "missing model.onnx":
        (path / "model.onnx").unlink()
    elif how == "onnx input shape disagrees":
        raw = json.loads(meta.read_text())
        raw["input"]["height"] = raw["input"]["width"] = 32
        raw["onnx"]["inputs"][0]["shape"] = [-1, 32, 32, 1]
        raw["cam"] = None  # (cam.onnx would disagree first; this case is about model.onnx)
        meta.write_text(json.dumps(raw))
    elif how == "onnx file garbage":
        (path / "model.onnx").write_bytes(b"\x08\x01garbage")


BROKEN = {
    "truncated metadata.json": "metadata.json: not valid JSON",
    "missing key": "metadata.json: architecture.cam_layer: Field required",
    "wrong format_version": "metadata.json: format_version 7",
    "missing model.onnx": "model.onnx: missing",
    "onnx input shape disagrees": "model.onnx: input 'image' has shape [-1, 64, 64, 1]; metadata.json says [-1, 32, 32, 1]",
    "onnx file garbage": "model.onnx: ONNX Runtime cannot load it",
}


@pytest.mark.parametrize("how", list(BROKEN))
def test_bundle_check_names_the_file_and_the_fault(bundle_copy, how):
    _break(bundle_copy, how)
    with pytest.raises(BundleError) as err:
        check_bundle(bundle_copy)
    assert BROKEN[how] in str(err.value)
    res = runner.invoke(app, ["bundle", "check", str(bundle_copy)])
    line = " ".join(res.output.split())  # rich may wrap; the message is one logical line
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and line.startswith("error: ") and BROKEN[how] in line


@pytest.mark.parametrize("command", ["predict", "evaluate", "explain"])
def test_every_command_reports_a_broken_bundle_the_same_way(bundle_copy, tiny_data, tmp_path, command):
    _break(bundle_copy, "missing key")
    image = next((tiny_data / "Normal").glob("*.png"))
    args = {"predict": ["predict", str(image), "--model", str(bundle_copy)],
            "evaluate": ["evaluate", "--model", str(bundle_copy), "--data", str(tiny_data)],
            "explain": ["explain", str(image), "--model", str(bundle_copy), "--out", str(tmp_path / "x")]}[command]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and BROKEN["missing key"] in " ".join(res.output.split()), res.output


def test_bundle_check_ok_line(tiny_models):
    res = runner.invoke(app, ["bundle", "check", str(tiny_models / "tiny")])
    assert res.exit_code == 0 and res.output.startswith("ok: ")


@pytest.mark.slow  # two exports with their ONNX and Grad-CAM parity checks
def test_a_failed_write_publishes_nothing_and_the_next_one_does(tiny_models, tmp_path, monkeypatch):
    import covid_cxr.publish.writer as writer

    b = load_bundle(tiny_models / "tiny")
    raw = b.metadata.model_dump(include={"architecture", "classes", "input"})
    content = BundleContent.model_validate(raw)
    model, images = load_torch(b), np.zeros((1, 64, 64), np.float32)
    monkeypatch.setattr(writer, "onnx_parity", lambda *a, **k: 1.0)  # a bad export
    with pytest.raises(BundleError, match="disagrees with PyTorch"):
        writer.write_bundle(tmp_path, "m", model, content, images)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="input.channels"):  # a wrong field fails where the content is made
        BundleContent.model_validate({**raw, "input": {**raw["input"], "channels": 3}})
    op = {"class_name": "nope", "threshold": 0.5, "target_recall": 0.9, "val_recall": 0.9, "val_images": 3}
    with pytest.raises(ValueError, match="operating_point.class_name"):  # whole-metadata rules: after the export
        writer.write_bundle(tmp_path, "m", model, content.model_copy(update={"operating_point": op}), images)
    assert list((tmp_path / "m").iterdir()) == []  # no half-written version, no staging folder
    assert writer.write_bundle(tmp_path, "m", model, content, images).version == 1
    assert check_bundle(tmp_path / "m").metadata.training is None
