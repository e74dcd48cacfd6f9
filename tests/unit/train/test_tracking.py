"""Experiment tracking: the tiny bundle's training run, read back with the MLflow client
(configuration, per-epoch metrics, test metrics, bundle path); the CSV default; a missing package."""

from __future__ import annotations

import pytest

from covid_cxr.bundle import load_bundle
from covid_cxr.core.config import TrainConfig

mlflow = pytest.importorskip("mlflow")


def test_mlflow_run_holds_config_epochs_test_metrics_and_bundle(tiny_models, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only so

    client = MlflowClient(tracking_uri=(tiny_models / ".work" / "mlruns").as_uri())
    exp = client.get_experiment_by_name("covid-cxr")
    (run,) = client.search_runs([exp.experiment_id])
    bundle = load_bundle(tiny_models / "tiny")
    p, m = run.data.params, run.data.metrics
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert (p["arch"], p["weights"], p["epochs"], p["image_size"]) == ("efficientnet_lite0", "none", "2", "64")
    assert p["run_id"] == bundle.metadata.training.config.run_id() and "tracking_uri" not in p
    recorded = load_bundle(p["bundle_path"])  # where it was written (the fixture hands out a copy)
    assert recorded.path.parts[-2:] == ("tiny", "1") and recorded.metadata == bundle.metadata
    assert [h.step for h in client.get_metric_history(run.info.run_id, "val_acc")] == [0, 1]  # per epoch
    assert m["test_accuracy"] == pytest.approx(bundle.metadata.test_metrics.accuracy)
    assert {"test_macro_f1", "test_recall_COVID-19", "train_loss", "val_loss"} <= set(m)


def test_csv_is_the_default_and_run_id_ignores_tracking():
    assert TrainConfig().logger == "csv"
    assert TrainConfig(logger="mlflow", tracking_uri="http://x").run_id() == TrainConfig().run_id()
    assert TrainConfig(devices=2).run_id() != TrainConfig().run_id()  # DDP splits batches: other results


def test_a_missing_tracking_package_is_one_line(monkeypatch):
    import importlib.util

    from pydantic import ValidationError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "mlflow" else real(n, *a))
    with pytest.raises(ValidationError, match="needs the mlflow-skinny package: pip install mlflow-skinny"):
        TrainConfig(logger="mlflow")
