"""Selective prediction figures, and `evaluate` on a labelled folder that lacks some classes."""

from __future__ import annotations

import json
import shutil

import numpy as np
from typer.testing import CliRunner

from covid_cxr.cli import app
from covid_cxr.evaluate.selective import risk_coverage, selective_metrics

runner = CliRunner()


def test_risk_coverage_by_hand():
    # confidences 0.9 (right), 0.8 (wrong), 0.7 (right), 0.6 (right)
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    y = np.array([0, 0, 0, 1])
    cov, risk = risk_coverage(y, probs)
    assert np.allclose(cov, [0.25, 0.5, 0.75, 1.0]) and np.allclose(risk, [0, 0.5, 1 / 3, 0.25])
    s = selective_metrics(y, probs, accepted=np.array([True, False, True, True]))
    assert np.isclose(s.aurc, np.mean([0, 0.5, 1 / 3, 0.25]))
    assert s.at_coverage["0.90"].model_dump() == {"accuracy": 0.75, "images": 4, "min_confidence": 0.6}
    assert s.at_coverage["0.80"].images == 4  # ceil(3.2)
    assert s.gate.model_dump() == {"accepted_share": 0.75, "accuracy_accepted": 1.0, "accuracy_rejected": 0.0}
    assert selective_metrics([], np.zeros((0, 2))) is None


def test_declining_the_least_confident_helps_a_model_whose_confidence_means_something():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 1000)
    sure = rng.random(1000)
    probs = np.full((1000, 3), (1 - sure[:, None]) / 3)
    right = rng.random(1000) < 0.5 + 0.5 * sure  # the surer, the likelier right
    pred = np.where(right, y, (y + 1) % 3)
    probs[np.arange(1000), pred] += sure
    s = selective_metrics(y, probs)
    assert s.at_coverage["0.80"].accuracy > s.at_coverage["0.90"].accuracy > s.full_coverage_accuracy


def test_evaluate_accepts_a_folder_lacking_classes_and_refuses_one_with_none(tiny_models, tiny_data, tmp_path):
    only = tmp_path / "covid-only"
    first = sorted(p for p in tiny_data.iterdir() if p.is_dir())[0]
    shutil.copytree(first, only / first.name)
    r = runner.invoke(app, ["evaluate", "--model", str(tiny_models / "tiny"), "--data", str(only),
                            "--out", str(tmp_path / "rep"), "--json", str(tmp_path / "m.json")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n"] == 12 and len(m["classes_absent"]) == 2 and first.name not in m["classes_absent"]
    assert m["selective"]["at_coverage"]["0.90"]["images"] == 11 and 0 <= m["selective"]["aurc"] <= 1
    assert "Selective prediction" in (tmp_path / "rep" / "metrics.md").read_text()
    assert (tmp_path / "rep" / "risk_coverage.png").is_file()
    none = tmp_path / "no-classes" / "misc"
    none.mkdir(parents=True)
    r = runner.invoke(app, ["evaluate", "--model", str(tiny_models / "tiny"), "--data", str(none.parent)])
    assert r.exit_code == 2 and "error:" in r.output


def test_a_class_without_films_gets_a_recall_interval_the_bundle_schema_accepts():
    """A site's test split may lack a class (site adaptation): its recall interval is all of [0, 1]
    (a NaN one made the adapted bundle's metadata.json unreadable); present classes keep Wilson's."""
    import numpy as np

    from covid_cxr.core.results import Metrics
    from covid_cxr.evaluate.metrics import compute_metrics

    probs = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0]])
    m = compute_metrics(np.array([0, 0, 1, 1]), probs, ["a", "b", "c"])
    assert m.per_class["c"].recall_ci95 == (0.0, 1.0)
    lo, hi = m.per_class["b"].recall_ci95
    assert 0 < lo < 0.5 < hi < 1
    assert Metrics.model_validate_json(m.model_dump_json()) == m  # what metadata.json holds reads back
