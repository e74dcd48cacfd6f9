"""Lower precision only where it keeps the answers (issue 19 item 4): OpenVINO as a runtime, the
measurement that publishes its decision, and the refusal of variants never measured or refused.
The session's tiny bundle (64 px, its own validation split of generated images)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from covid_cxr.bundle import BundleMetadata, load_bundle
from covid_cxr.bundle.runtime import RuntimeRefused
from covid_cxr.cli import app
from covid_cxr.publish.precision import add_precision, refit_threshold

ov = pytest.importorskip("openvino")
runner = CliRunner()
# bf16 needs AVX-512 BF16 or AMX; elsewhere OpenVINO runs a bf16 hint in fp32 and nothing can differ
needs_bf16 = pytest.mark.skipif("BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"),
                                reason="this CPU has no bf16")


def images(n: int = 6, seed: int = 0) -> np.ndarray:
    from covid_cxr.publish.writer import smooth_images

    return smooth_images(n, 64, 64, seed)


@pytest.fixture(scope="module")
def measured(tiny_models, tmp_path_factory) -> Path:
    """MODELS/tiny with v2 = v1 + its bf16 measurement (published by `add_precision`)."""
    models = tmp_path_factory.mktemp("precision") / "models"
    shutil.copytree(tiny_models / "tiny" / "1", models / "tiny" / "1")
    add_precision(models / "tiny", "bf16")
    return models / "tiny"


def test_measuring_publishes_the_next_version_with_the_decision(tiny_models, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(tiny_models / "tiny" / "1", models / "tiny" / "1")
    r = runner.invoke(app, ["bundle", "precision", str(models / "tiny"), "--precision", "bf16-split"])
    assert r.exit_code == 0, r.output
    assert "bf16-split accepted" in r.output or "bf16-split refused" in r.output
    old, new = load_bundle(models / "tiny", 1), load_bundle(models / "tiny", 2)
    assert old.metadata.precision_variants is None  # the measured version stays as it was
    v = new.metadata.precision_variants["bf16-split"]
    n_val = old.metadata.training.data.counts["val"]
    assert v.n == sum(n_val.values()) and v.measured_on == "val split" and v.runtime == "openvino"
    rule_holds = v.changed_predictions <= 0.005 * v.n and (v.changed_gate or 0) <= 0.005 * v.n
    assert v.accepted == rule_holds
    assert v.changed_gate is not None and v.changed_gate <= v.changed_gate_as_written  # refit only if it helps
    assert {p.name for p in old.path.iterdir()} <= {p.name for p in new.path.iterdir()}  # every file copied
    BundleMetadata.model_validate(json.loads((new.path / "metadata.json").read_text()))


def test_measuring_refuses_fp32_and_unknown_precisions(measured):
    r = runner.invoke(app, ["bundle", "precision", str(measured), "--precision", "fp16"])
    assert r.exit_code == 2 and "measure one of bf16, bf16-split, int8" in r.output
    with pytest.raises(Exception, match="fp32 needs no measurement"):
        add_precision(measured, "fp32")


@needs_bf16
def test_an_accepted_variant_serves_close_to_fp32(measured):
    fp32 = load_bundle(measured)
    b = load_bundle(measured, runtime="openvino", precision="bf16")
    assert b.metadata.precision_variants["bf16"].accepted  # on the tiny bundle: 0 of its 6 changed
    x = images()
    want, got = fp32.answer(x), b.answer(x)
    assert np.abs(got.probabilities - want.probabilities).max() < 5e-3  # bf16: 8-bit mantissa
    assert np.abs(got.probabilities - want.probabilities).max() > 0  # it did run in bf16, not fp32
    assert (got.labels == want.labels).all()
    assert got.in_distribution is not None and got.ood_score.shape == (6,)


def test_openvino_fp32_needs_no_measurement_and_answers_as_onnx_runtime(tiny_models):
    want = load_bundle(tiny_models / "tiny").answer(images())
    got = load_bundle(tiny_models / "tiny", runtime="openvino").answer(images())
    assert np.abs(got.probabilities - want.probabilities).max() < 1e-5
    assert np.allclose(got.ood_score, want.ood_score, rtol=1e-4)
    assert (got.in_distribution == want.in_distribution).all()


def test_an_unmeasured_variant_is_refused_with_the_command(tiny_models, measured):
    with pytest.raises(RuntimeRefused, match=r"int8 was never measured.*covid-cxr bundle precision MODELS/tiny "
                                             r"--precision int8"):
        load_bundle(measured, runtime="openvino", precision="int8")
    with pytest.raises(RuntimeRefused, match="never measured"):  # v1 has no measurement at all
        load_bundle(tiny_models / "tiny", runtime="openvino", precision="bf16")


def test_a_refused_variant_is_refused_with_its_numbers(measured, tmp_path):
    dst = tmp_path / "tiny" / "2"
    shutil.copytree(load_bundle(measured).path, dst)
    raw = json.loads((dst / "metadata.json").read_text())
    raw["precision_variants"]["bf16"].update(accepted=False, changed_predictions=2)
    (dst / "metadata.json").write_text(json.dumps(raw))
    with pytest.raises(RuntimeRefused, match=r"bf16 was refused when measured: 2/6 predictions changed \(33.3%\)"):
        load_bundle(dst, runtime="openvino", precision="bf16")
    assert load_bundle(dst).precision == "fp32"  # fp32 still serves


def test_runtime_and_precision_names_are_checked(measured):
    with pytest.raises(RuntimeRefused, match="runs on OpenVINO only"):
        load_bundle(measured, precision="bf16")  # ONNX Runtime serves fp32 only
    with pytest.raises(RuntimeRefused, match="choose one of onnxruntime, openvino"):
        load_bundle(measured, runtime="tensorrt")
    with pytest.raises(RuntimeRefused, match="choose one of fp32, bf16"):
        load_bundle(measured, runtime="openvino", precision="fp8")


def test_without_openvino_installed_the_error_names_the_extra(measured, monkeypatch):
    b = load_bundle(measured, runtime="openvino", precision="bf16")  # loading checks names and records
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(RuntimeRefused, match=r"pip install 'covid-cxr\[openvino\]'"):
        b.answer(images(1))


def test_a_variant_record_must_sit_under_its_own_name(measured):
    raw = json.loads((load_bundle(measured).path / "metadata.json").read_text())
    raw["precision_variants"]["int8"] = raw["precision_variants"].pop("bf16")
    with pytest.raises(ValueError, match="precision_variants.int8 holds a measurement of 'bf16'"):
        BundleMetadata.model_validate(raw)
    raw["precision_variants"]["int8"].update(precision="int8", file="../../etc/passwd")
    with pytest.raises(ValueError, match="file"):
        BundleMetadata.model_validate(raw)


def test_refit_accepts_as_many_as_fp32_did():
    scores = np.array([5.0, 1.0, 3.0, 2.0, 4.0])
    fp32_inside = np.array([True, True, False, True, False])  # three accepted
    t = refit_threshold(fp32_inside, scores)
    assert 3.0 < t < 4.0 and int(np.sum(scores <= t)) == 3
    assert np.sum(scores <= refit_threshold(np.zeros(5, bool), scores)) == 0  # none accepted: none
    assert np.sum(scores <= refit_threshold(np.ones(5, bool), scores)) == 5


def _layers(compiled) -> set[tuple[str, str]]:
    """(layer type, precision it runs in) of a compiled model, as OpenVINO's CPU plugin chose."""
    return {(op.get_rt_info()["layerType"].astype(str), op.get_rt_info()["runtimePrecision"].astype(str))
            for op in compiled.get_runtime_model().get_ordered_ops()}


@needs_bf16
def test_bf16_split_runs_convolutions_in_bf16_and_head_and_gate_in_fp32(tiny_models):
    from covid_cxr.bundle.runtime import compile_openvino

    onnx = load_bundle(tiny_models / "tiny").onnx_path
    (whole,) = compile_openvino(onnx, "bf16", 1)
    assert ("FullyConnected", "bf16") in _layers(whole)  # what the split is for: bf16 reaches the head
    backbone, tail = compile_openvino(onnx, "bf16-split", 1)
    assert ("Convolution", "bf16") in _layers(backbone)
    assert not {t for t, _ in _layers(backbone)} & {"FullyConnected", "Softmax"}
    assert ("FullyConnected", "f32") in _layers(tail) and ("Softmax", "f32") in _layers(tail)
    assert not any(p == "bf16" for _, p in _layers(tail))
    assert len(backbone.outputs) > 1  # the last block and the gate's stages cross the cut
    (fp32,) = compile_openvino(onnx, "fp32", 1)
    assert not any(p == "bf16" for _, p in _layers(fp32))  # fp32 pinned (OpenVINO picks bf16 on AMX)
