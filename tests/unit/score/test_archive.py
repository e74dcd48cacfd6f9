"""`covid-cxr score`: one row per image (errors as rows, no label where the gate rejects), resumable
from its Parquet parts, folder or manifest, one process or Ray Data; torch-free."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys

import numpy as np
import pytest

from covid_cxr.bundle import load_bundle
from covid_cxr.data.decode import load_for_model
from covid_cxr.core.errors import UserError
from covid_cxr.score import list_images, read_predictions, score_archive

pytest.importorskip("pyarrow", reason="score writes Parquet: pip install -e '.[archive]'")


@pytest.fixture
def archive(tiny_data, tmp_path):
    """The tiny dataset plus one file that is not an image."""
    root = tmp_path / "archive"
    shutil.copytree(tiny_data, root)
    (root / "Normal" / "broken.png").write_bytes(b"not an image")
    return root


def test_rows_hold_probabilities_gate_label_and_errors(tiny_models, archive, tmp_path):
    s = score_archive(tiny_models / "tiny", archive, tmp_path / "preds.parquet", part_rows=8)
    rows = {r["path"]: r for r in read_predictions(tmp_path / "preds.parquet").to_pylist()}
    assert len(rows) == s.scored == s.total == 37 and s.errors == 1 and s.parts == 5
    bad = rows.pop("Normal/broken.png")
    assert bad["error"] and bad["label"] is None and bad["prob:Normal"] is None and bad["in_distribution"] is None
    b = load_bundle(tiny_models / "tiny")
    paths = sorted(rows)
    probs, score, inside = b.predict_with_ood(np.stack([load_for_model(archive / p, 64, 64) for p in paths]))
    got = np.array([[rows[p][f"prob:{c}"] for c in b.classes] for p in paths])
    assert np.abs(got - probs).max() <= 1e-6
    assert np.allclose([rows[p]["ood_score"] for p in paths], score, rtol=1e-6)
    want = [b.classes[k] if ok else None for k, ok in zip(b.decide(probs), inside)]
    assert [rows[p]["label"] for p in paths] == want and [rows[p]["error"] for p in paths] == [None] * 36
    assert s.rejected == int((~inside).sum())  # a rejected image keeps its probabilities, loses its label
    assert all(rows[p]["prob:COVID-19"] is not None for p, ok in zip(paths, inside) if not ok)


def test_resumes_where_it_stopped(tiny_models, archive, tmp_path):
    out = tmp_path / "preds.parquet"
    score_archive(tiny_models / "tiny", archive, out, part_rows=8)
    parts = sorted(out.glob("part-*.parquet"))
    assert read_predictions(out).num_rows == 37 and len(parts) == 5
    parts[-1].unlink()  # as if the run had been killed before its last part
    (out / ".half-written.parquet.tmp").write_bytes(b"PAR1")  # a killed writer's hidden file is ignored
    again = score_archive(tiny_models / "tiny", archive, out, part_rows=8)
    assert again.scored == 37 - 32 and again.skipped == 32
    table = read_predictions(out)
    assert sorted(table.column("path").to_pylist()) == sorted(set(table.column("path").to_pylist()))
    assert table.num_rows == 37
    assert score_archive(tiny_models / "tiny", archive, out).scored == 0  # nothing left to do


def test_manifest_and_refusals(tiny_models, archive, tmp_path):
    manifest = archive / "list.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows([["COVID-19/COVID-19-0.png", "COVID-19"], ["Normal/gone.png", "Normal"]])
    root, paths = list_images(manifest)
    assert root == archive and paths == ["COVID-19/COVID-19-0.png", "Normal/gone.png"]
    s = score_archive(tiny_models / "tiny", manifest, tmp_path / "m.parquet")
    rows = {r["path"]: r for r in read_predictions(tmp_path / "m.parquet").to_pylist()}
    assert s.scored == 2 and rows["Normal/gone.png"]["error"].startswith("cannot read file")
    assert rows["COVID-19/COVID-19-0.png"]["error"] is None
    (tmp_path / "nopath.csv").write_text("file,label\na.png,x\n")
    with pytest.raises(UserError, match="'path' column"):
        score_archive(tiny_models / "tiny", tmp_path / "nopath.csv", tmp_path / "x.parquet")
    other = tmp_path / "models"
    shutil.copytree(tiny_models / "tiny" / "1", other / "tiny" / "1")
    raw = (other / "tiny" / "1" / "metadata.json").read_text().replace('"name": "tiny"', '"name": "other"', 1)
    (other / "other" / "1").mkdir(parents=True)
    for f in (other / "tiny" / "1").iterdir():
        if f.is_file():
            shutil.copy(f, other / "other" / "1" / f.name)
    (other / "other" / "1" / "metadata.json").write_text(raw)
    with pytest.raises(UserError, match="written by tiny v1"):  # another model's parts: never mixed
        score_archive(other / "other", manifest, tmp_path / "m.parquet")


def test_cli_errors_are_one_line_and_leave_nothing(tiny_models, tmp_path):
    res = subprocess.run([sys.executable, "-m", "covid_cxr", "score", "--model", str(tiny_models / "tiny"),
                          "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "p.parquet")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.splitlines()[-1].startswith("error: ") and "nope" in res.stderr
    assert not (tmp_path / "p.parquet").exists()


def test_scoring_does_not_import_torch(tiny_models, archive, tmp_path):
    code = (f"import sys; from covid_cxr.score import score_archive; "
            f"score_archive({str(tiny_models / 'tiny')!r}, {str(archive)!r}, {str(tmp_path / 'p')!r}); "
            "print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["actors", "data"])
def test_ray_gives_the_rows_of_one_process(tiny_models, archive, tmp_path, engine, monkeypatch):
    pytest.importorskip("ray.data", reason="--ray needs Ray Data: pip install -e '.[archive]'")
    from covid_cxr.score import on_ray

    monkeypatch.setattr(on_ray, "ENGINE", engine)
    one = score_archive(tiny_models / "tiny", archive, tmp_path / "one", part_rows=8)
    on_ray = score_archive(tiny_models / "tiny", archive, tmp_path / "ray", part_rows=8, ray="local", workers=2)
    assert on_ray.scored == one.scored == 37 and on_ray.errors == 1
    a = read_predictions(tmp_path / "one").sort_by("path").to_pylist()
    b = read_predictions(tmp_path / "ray").sort_by("path").to_pylist()
    assert [r["path"] for r in a] == [r["path"] for r in b] and [r["label"] for r in a] == [r["label"] for r in b]
    assert max(abs(x["prob:Normal"] - y["prob:Normal"]) for x, y in zip(a, b) if x["error"] is None) <= 1e-6


def _score_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "covid_cxr", "score", *args], capture_output=True, text=True,
                          timeout=300)


def test_ray_is_a_flag_and_an_address_implies_it(tiny_models, archive, tmp_path):
    """`--ray` takes no value (a value is refused); `--ray-address` goes to Ray (here an address Ray
    cannot parse: one line, exit 2, nothing written); neither scores in this process."""
    common = ["--model", str(tiny_models / "tiny"), "--data", str(archive)]
    res = _score_cli(*common, "--out", str(tmp_path / "a"), "--ray", "auto")
    assert res.returncode == 2 and "auto" in res.stderr and not (tmp_path / "a").exists(), res.stderr
    res = _score_cli(*common, "--out", str(tmp_path / "b"), "--ray-address", "nonsense")
    if "--ray needs Ray" not in res.stderr:  # Ray not installed: the other message
        assert "--ray-address nonsense: cannot reach a Ray cluster" in res.stderr, res.stderr
    assert res.returncode == 2 and res.stderr.splitlines()[-1].startswith("error: ")
    assert not list((tmp_path / "b").glob("*.parquet"))
    res = _score_cli(*common, "--out", str(tmp_path / "c"))
    assert res.returncode == 0 and "in one process" in " ".join(res.stdout.split()), res.stderr[-2000:]


@pytest.mark.slow
def test_ray_flag_alone_runs_on_a_local_cluster(tiny_models, archive, tmp_path):
    pytest.importorskip("ray.data", reason="--ray needs Ray Data: pip install -e '.[archive]'")
    res = _score_cli("--model", str(tiny_models / "tiny"), "--data", str(archive), "--out", str(tmp_path / "p"),
                     "--ray", "--workers", "2", "--threads", "1")
    # the summary wraps at the terminal's width: compare words, not lines
    assert res.returncode == 0 and "on Ray (local, 2 workers)" in " ".join(res.stdout.split()), res.stderr[-2000:]
    assert read_predictions(tmp_path / "p").num_rows == 37
