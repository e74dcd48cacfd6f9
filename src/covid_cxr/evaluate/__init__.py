"""Metrics (the study's table plus AUC and confidence intervals), plots, reports, comparison."""

from covid_cxr.evaluate.metrics import compute_metrics

__all__ = ["compute_metrics"]
