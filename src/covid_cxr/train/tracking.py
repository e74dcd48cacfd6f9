"""Experiment tracking through Lightning's loggers: CSV (default), TensorBoard or MLflow.

Each run records its configuration, the per-epoch metrics Lightning logs (train/val loss and
accuracy, learning rate), the final test metrics and the bundle it wrote. MLflow writes to a local
file store (MODELS/.work/mlruns) unless a tracking URI is given; CSV and TensorBoard write under
MODELS/.work/logs/<name>/version_<n>. The optional packages are imported only when chosen.
"""

from __future__ import annotations

import os
from pathlib import Path

from covid_cxr.core.config import check_available
from covid_cxr.core.results import Metrics

EXPERIMENT = "covid-cxr"


def default_tracking_uri(workdir: Path) -> str:
    """MODELS/.work/mlruns: MLflow's file store, needing no server or database. MLflow 3 keeps that
    backend in maintenance and asks for MLFLOW_ALLOW_FILE_STORE before using it; we set it for our
    own default only (give --tracking-uri sqlite:///... or http://... for anything shared)."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (Path(workdir).resolve() / "mlruns").as_uri()


def make_logger(cfg, workdir: Path):
    """The Lightning logger `cfg.logger` names (False for 'none'), with the configuration logged."""
    from lightning.pytorch import loggers

    check_available(cfg.logger)
    name = cfg.bundle_name
    if cfg.logger == "none":
        return False
    if cfg.logger == "csv":
        logger = loggers.CSVLogger(str(Path(workdir) / "logs"), name=name)
    elif cfg.logger == "tensorboard":
        logger = loggers.TensorBoardLogger(str(Path(workdir) / "logs"), name=name, default_hp_metric=False)
    else:
        uri = cfg.tracking_uri or default_tracking_uri(workdir)
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        logger = loggers.MLFlowLogger(experiment_name=EXPERIMENT, run_name=name, tracking_uri=uri)
    logger.log_hyperparams({**cfg.model_dump(mode="json"), "run_id": cfg.run_id()})
    return logger


def final_metrics(metrics: Metrics) -> dict[str, float]:
    """Flat, numeric test metrics: accuracy, macro F1 and per-class precision/recall/F1/AUC."""
    out = {"test_accuracy": metrics.accuracy}
    if metrics.macro_f1 is not None:
        out["test_macro_f1"] = metrics.macro_f1
    for cls, m in metrics.per_class.items():
        key = cls.replace(" ", "_")
        for k in ("precision", "recall", "f1", "roc_auc"):
            if getattr(m, k) is not None:
                out[f"test_{k}_{key}"] = float(getattr(m, k))
    return out


def log_result(logger, metrics: Metrics, bundle_path: Path, epochs: int) -> None:
    """After the bundle is written: the test metrics, and where the bundle is."""
    if not logger:
        return
    logger.log_metrics(final_metrics(metrics), step=epochs)
    logger.log_hyperparams({"bundle_path": str(Path(bundle_path).resolve())})
    logger.finalize("success")
