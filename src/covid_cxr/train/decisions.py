"""Test metrics as the bundle will decide: the argmax table, and beside it the operating point's
(`--target-recall`, threshold fitted on the validation split, never on test), and per-source
tables when the data came from several folders."""

from __future__ import annotations

from covid_cxr.core.results import Metrics
from covid_cxr.evaluate.metrics import by_source, with_operating_point
from covid_cxr.evaluate.operating_point import choose


def decision_metrics(model, inputs, prepared, cfg, trust=None) -> Metrics:
    """The test split's metrics as the bundle answers: temperature-scaled probabilities (with ECE,
    Brier and the OOD rate when `trust` is given), and the operating point fitted on the validation
    split's scaled probabilities."""
    from covid_cxr.train.fit import test_probabilities
    from covid_cxr.trust.fit import apply_temperature
    from covid_cxr.evaluate.trust_report import add_trust_metrics

    classes = prepared.classes
    scale = (lambda p: apply_temperature(p, trust.temperature)) if trust is not None else (lambda p: p)
    y, raw = test_probabilities(model, prepared, cfg.size, inputs.features)
    probs = scale(raw)
    op = None
    if cfg.target_recall:
        yv, pv = test_probabilities(model, prepared, cfg.size, inputs.features, split="val")
        op = choose(yv, scale(pv), classes, cfg.target_recall, cfg.target_confidence, cfg.target_batch)
    m = with_operating_point(add_trust_metrics(y, raw, classes, trust), y, probs, op)
    per_source = by_source(y, probs, classes, [r.source for r in prepared.splits["test"]], op)
    return m.model_copy(update={"by_source": per_source or None})
