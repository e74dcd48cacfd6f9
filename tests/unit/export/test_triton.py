"""`covid-cxr export --format triton`: the repository's layout, config.pbtxt parsed by Triton's own
model-config protobuf (from tritonclient[grpc]), and the exported model's answers equal the bundle's."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from covid_cxr.bundle import load_bundle, open_session
from covid_cxr.bundle.schema import TensorSpec
from covid_cxr.cli import app
from covid_cxr.data.decode import load_for_model
from covid_cxr.export.triton import model_config, to_pbtxt

mc = pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import text_format  # noqa: E402


def parse(text: str):
    return text_format.Parse(text, mc.ModelConfig())


def test_export_loads_as_triton_would(tiny_models, tiny_data, tmp_path):
    repo = tmp_path / "repo"
    r = CliRunner().invoke(app, ["export", "--format", "triton", "--models", str(tiny_models), "--out", str(repo)])
    assert r.exit_code == 0, r.output
    tree = sorted(str(p.relative_to(repo)) for p in repo.rglob("*"))
    assert tree == ["tiny", "tiny/1", "tiny/1/model.onnx", "tiny/config.pbtxt", "tiny/labels.txt"]
    cfg = parse((repo / "tiny" / "config.pbtxt").read_text())
    bundle = load_bundle(tiny_models / "tiny")
    assert cfg.name == "tiny" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 64
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 5000
    (i,) = cfg.input
    outs = {o.name: o for o in cfg.output}  # probabilities, and the trust outputs (issue 8)
    assert list(outs) == [t.name for t in bundle.metadata.onnx.outputs]
    o = outs["probabilities"]
    assert (i.name, list(i.dims), mc.DataType.Name(i.data_type)) == ("image", [64, 64, 1], "TYPE_FP32")
    assert (o.name, list(o.dims), o.label_filename) == ("probabilities", [3], "labels.txt")
    assert (repo / "tiny" / "labels.txt").read_text().splitlines() == bundle.classes
    x = np.stack([load_for_model(p, 64, 64) for p in sorted(tiny_data.rglob("*.png"))[::6]])
    got = open_session(repo / "tiny" / "1" / "model.onnx").run([o.name], {i.name: x[..., None]})[0]
    assert np.abs(got - bundle.predict(x)).max() == 0.0
    again = CliRunner().invoke(app, ["export", "--models", str(tiny_models), "--out", str(repo), "--all-versions"])
    assert again.exit_code == 0 and parse((repo / "tiny" / "config.pbtxt").read_text()).version_policy.HasField("all")
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]  # nothing half-written left


def test_trust_outputs_appear_from_metadata(tiny_models):
    """Outputs a bundle adds (issue 8: ood_score [N], in_distribution [N]) need no exporter change."""
    meta = load_bundle(tiny_models / "tiny").metadata.model_copy(deep=True)
    meta.onnx.outputs += [TensorSpec(name="ood_score", shape=[-1]), TensorSpec(name="in_distribution", shape=[-1])]
    cfg = parse(to_pbtxt(model_config(meta)))
    ood = {o.name: o for o in cfg.output}["ood_score"]
    assert list(ood.dims) == [1] and list(ood.reshape.shape) == [] and ood.HasField("reshape")


def test_export_errors_are_one_line(tiny_models, tmp_path):
    r = CliRunner().invoke(app, ["export", "--models", str(tiny_models), "--out", str(tmp_path / "r"),
                                 "--model", "absent"])
    assert r.exit_code == 2 and "no model" in r.output
    r = CliRunner().invoke(app, ["export", "--format", "savedmodel", "--models", str(tiny_models),
                                 "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and "triton" in r.output
