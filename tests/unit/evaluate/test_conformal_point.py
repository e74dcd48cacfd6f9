"""The conformal operating point: recall >= target on new images with the stated probability,
where the validation-quantile rule meets it about half the time."""

from __future__ import annotations

import numpy as np
import pytest

from covid_cxr.bundle.schema import OperatingPoint
from covid_cxr.core.config import TrainConfig
from covid_cxr.evaluate.operating_point import batch_rank, choose, conformal_rank, fit_threshold


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


def batch_hit_rate(n: int, batch: int, target: float, rule_batch, draws: int = 4000) -> float:
    """Share of (calibration, new batch) draws whose batch of `batch` uniform scores has recall >= target,
    the threshold fitted by fit_threshold (its rank is the same for every draw: checked on the first)."""
    rng = np.random.default_rng(2)
    cal = rng.random((draws, n))
    t0 = fit_threshold(np.zeros(n, int), np.stack([cal[0], 1 - cal[0]], 1), 0, target, 0.9, rule_batch)
    k = 1 + int(np.flatnonzero(np.sort(cal[0])[::-1] == t0)[0])
    t = np.sort(cal, axis=1)[:, ::-1][:, k - 1]
    return float(((rng.random((draws, batch)) >= t[:, None]).mean(1) >= target).mean())


def test_the_batch_rule_holds_on_each_batch_where_the_population_rule_does_not():
    n, batch, target = 227, 226, 0.97
    assert batch_hit_rate(n, batch, target, batch) >= 0.9 - 0.015
    assert batch_hit_rate(n, batch, target, None) < 0.88  # population recall held; a 226-film batch adds its noise
    k, reached = batch_rank(n, batch, target, 0.9)
    assert reached >= 0.9 and k > conformal_rank(n, target, 0.9)[0]  # a lower threshold: the price
    from scipy.stats import betabinom

    assert betabinom.cdf(6, batch, n + 2 - k, k - 1) < 0.9  # one rank fewer would not hold (6 misses allowed)


def test_the_batch_rule_needs_a_confidence():
    assert TrainConfig(target_recall="COVID-19=0.97", target_batch=200).target_confidence == 0.9  # the default
    with pytest.raises(ValueError, match="--target-batch needs --target-confidence"):
        TrainConfig(target_recall="COVID-19=0.97", target_confidence=None, target_batch=200)


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
    assert conf.rule == "conformal" and conf.confidence_reached >= 0.9 and conf.batch is None
    batch = choose(y, p, ["COVID-19", "Normal", "Viral"], "COVID-19=0.95", confidence=0.9, batch=100)
    assert batch.batch == 100 and batch.threshold <= conf.threshold
    assert conf.threshold <= plain.threshold and conf.val_recall >= plain.val_recall
    with pytest.raises(ValueError):
        OperatingPoint.model_validate({**conf.model_dump(), "confidence": 1.5})
    with pytest.raises(ValueError, match="extra"):  # strict: a misspelt field fails where it is made
        OperatingPoint.model_validate({**conf.model_dump(), "treshold": 0.5})
