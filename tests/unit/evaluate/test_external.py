"""evaluate_folder writes its report folder whole or not at all (a failure mid-way leaves none)."""

from __future__ import annotations

import pytest

from covid_cxr.bundle import load_bundle
from covid_cxr.evaluate import external
from covid_cxr.evaluate.external import evaluate_folder


def test_an_interrupt_while_writing_leaves_no_report(bundle_copy, tiny_data, tmp_path, monkeypatch):
    """Ctrl-C arrives while the plots are drawn (after the manifest and predictions are written):
    neither the report nor the folders made for it remain. The other side: the same call, left to
    finish, writes the whole report."""
    def interrupted(y, probs, path, title):
        path.write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    out = tmp_path / "runs" / "evaluate" / "tiny"
    with monkeypatch.context() as m:
        m.setattr(external, "risk_coverage_png", interrupted)
        with pytest.raises(KeyboardInterrupt):
            evaluate_folder(load_bundle(bundle_copy), tiny_data, out, progress=False)
    assert not (tmp_path / "runs").exists()
    evaluate_folder(load_bundle(bundle_copy), tiny_data, out, progress=False)
    assert {"manifest.csv", "predictions.csv", "metrics.json", "metrics.md", "risk_coverage.png"} <= \
        {p.name for p in out.iterdir()}
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]
