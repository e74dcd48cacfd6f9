"""The conformal operating point: recall >= target on new images with the stated probability,
where the validation-quantile rule meets it about half the time."""

from __future__ import annotations

import numpy as np
import pytest

from covid_cxr.bundle.schema import OperatingPoint
from covid_cxr.evaluate.operating_point import choose, conformal_rank, fit_threshold


def hit_rate(n: int, target: float, confidence, draws: int = 3000) -> float:
    """Share of calibration draws (n uniform scores) whose threshold keeps population recall >= target
    (a uniform score's recall at t is 1 - t)."""
    rng = np.random.default_rng(0)
    y = np.zeros(n, int)
    hits = 0
    for _ in range(draws):
        p = rng.random(n)
        t = fit_threshold(y, np.stack([p, 1 - p], 1), 0, target, confidence)
        hits += (1 - t) >= target
    return hits / draws


def test_conformal_meets_the_target_with_its_confidence_the_quantile_does_not():
    n, target = 227, 0.95
    assert hit_rate(n, target, 0.9) >= 0.9 - 0.015  # 3 sigma of 3000 draws
    assert hit_rate(n, target, None) < 0.75  # the old rule: met on about half the draws


def test_conformal_rank_is_the_smallest_that_holds():
    k, reached = conformal_rank(227, 0.98, 0.9)
    assert reached >= 0.9 and conformal_rank(227, 0.98, 0.5)[0] < k <= 227
    from scipy.stats import beta

    assert beta.sf(0.98, k - 1, 227 + 2 - k) < 0.9  # one rank fewer would not hold
    k, reached = conformal_rank(20, 0.98, 0.9)  # too few images: the lowest score, and what it reaches
    assert k == 20 and reached < 0.9


def test_choose_records_the_rule():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 600)
    p = rng.dirichlet(np.ones(3), 600)
    p[np.arange(600), y] += 1
    p /= p.sum(1, keepdims=True)
    plain = choose(y, p, ["COVID-19", "Normal", "Viral"], "COVID-19=0.95")
    conf = choose(y, p, ["COVID-19", "Normal", "Viral"], "COVID-19=0.95", confidence=0.9)
    assert plain.rule == "quantile" and plain.confidence is None
    assert conf.rule == "conformal" and conf.confidence_reached >= 0.9
    assert conf.threshold <= plain.threshold and conf.val_recall >= plain.val_recall
    with pytest.raises(ValueError):
        OperatingPoint.model_validate({**conf.model_dump(), "confidence": 1.5})
    with pytest.raises(ValueError, match="extra"):  # strict: a misspelt field fails where it is made
        OperatingPoint.model_validate({**conf.model_dump(), "treshold": 0.5})
