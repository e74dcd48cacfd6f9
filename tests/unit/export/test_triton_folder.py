"""Triton export writes what Triton loads (issue 17, item 8): config.pbtxt's name is the model
folder's (Triton refuses any other), and ONNX external data files travel with model.onnx; a
location outside the bundle is refused."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

from covid_cxr.bundle import BundleError, load_bundle, open_session
from covid_cxr.export.triton import export_triton, external_data


def _config_name(folder) -> str:
    line = next(ln for ln in (folder / "config.pbtxt").read_text().splitlines() if ln.startswith("name:"))
    return line.split(":", 1)[1].strip().strip('"')


def test_config_name_is_the_folder_name(bundle_copy, tmp_path):
    models = bundle_copy.parents[1]
    shutil.copytree(models / "tiny", models / "good")  # metadata still says "tiny"
    out = export_triton(models, tmp_path / "repo")
    assert {p.name: _config_name(p) for p in out} == {"good": "good", "tiny": "tiny"}


def _to_external(onnx_path, location: str) -> None:
    model = onnx.load(str(onnx_path))
    onnx.save_model(model, str(onnx_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)


def test_external_data_is_copied_and_runs_from_the_export(bundle_copy, tmp_path):
    assert external_data(bundle_copy / "model.onnx") == []
    _to_external(bundle_copy / "model.onnx", "weights.bin")
    assert external_data(bundle_copy / "model.onnx") == ["weights.bin"]
    (out,) = export_triton(bundle_copy.parents[1], tmp_path / "repo")
    assert sorted(p.name for p in (out / "1").iterdir()) == ["model.onnx", "weights.bin"]
    x = np.full((1, 64, 64, 1), 0.5, np.float32)
    got = open_session(out / "1" / "model.onnx").run(["probabilities"], {"image": x})[0]
    np.testing.assert_array_equal(got, load_bundle(bundle_copy).predict(x[..., 0]))


def test_external_data_outside_the_bundle_is_refused(bundle_copy, tmp_path):
    _to_external(bundle_copy / "model.onnx", "weights.bin")
    model = onnx.load(str(bundle_copy / "model.onnx"), load_external_data=False)
    shutil.move(bundle_copy / "weights.bin", bundle_copy.parent / "weights.bin")
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../weights.bin"
    onnx.save(model, str(bundle_copy / "model.onnx"))
    with pytest.raises(BundleError, match="external data|ONNX Runtime cannot load"):
        export_triton(bundle_copy.parents[1], tmp_path / "repo", names=["tiny"])
    with pytest.raises(BundleError, match="not a file inside the bundle"):
        external_data(bundle_copy / "model.onnx")
    assert not (tmp_path / "repo" / "tiny").exists()
