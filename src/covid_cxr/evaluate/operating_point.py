"""An operating point: a decision threshold on one class's probability, chosen on the validation
split to reach a target recall (screening wants COVID-19 sensitivity more than accuracy).

Rule: predict the class when its probability reaches the threshold, otherwise the argmax. The
threshold only ever *adds* predictions of that class, so its recall is never below the argmax's;
the price is paid by the other classes' recall (the report prints both tables). numpy only: the
server, `predict` and `evaluate` apply it without torch.
"""

from __future__ import annotations

import math

import numpy as np

from covid_cxr.bundle.schema import decide  # the rule lives with the bundle's contract
from covid_cxr.core.config import parse_target
from covid_cxr.core.errors import ConfigError
from covid_cxr.core.results import OperatingPoint


def conformal_rank(n: int, target: float, confidence: float) -> tuple[int, float]:
    """(k, confidence reached): the smallest k such that the k-th largest of n calibration scores,
    taken as the threshold, gives recall >= target on the population they were drawn from with
    probability >= confidence over the draw of the calibration set.

    Why it holds (training-conditional conformal, Vovk 2012): for exchangeable continuous scores the
    share of the population at or above the k-th largest of n is Beta(k, n + 1 - k); ties only raise
    it. Where even k = n falls short, k = n and the confidence it reaches are returned."""
    from scipy.stats import beta

    ks = np.arange(1, n + 1)
    return _smallest_rank(beta.sf(target, ks, n + 1 - ks), confidence)


def _smallest_rank(reached: np.ndarray, confidence: float) -> tuple[int, float]:
    """(k, reached[k - 1]) for the smallest rank k whose confidence reaches `confidence`, else the last."""
    ok = np.flatnonzero(reached >= confidence)
    k = int(ok[0]) + 1 if len(ok) else len(reached)
    return k, float(reached[k - 1])


def batch_rank(n: int, batch: int, target: float, confidence: float) -> tuple[int, float]:
    """As `conformal_rank`, for recall >= target on each batch of `batch` new images of the class
    rather than on the population: what a site counts when it audits a month of films.

    Why it holds: the population share below the k-th largest of n scores is Beta(n + 1 - k, k), so
    the misses among `batch` new images are BetaBinomial(batch, n + 1 - k, k), exactly, for
    exchangeable continuous scores; the target allows batch - ceil(target x batch) misses."""
    from scipy.stats import betabinom

    allowed = batch - math.ceil(target * batch - 1e-9)
    ks = np.arange(1, n + 1)
    return _smallest_rank(betabinom.cdf(allowed, batch, n + 1 - ks, ks), confidence)


def rank(n: int, target: float, confidence: float, batch: int | None = None) -> tuple[int, float]:
    """(k, confidence reached) of the conformal rule: over the population, or over batches of `batch`."""
    return conformal_rank(n, target, confidence) if batch is None else batch_rank(n, batch, target, confidence)


def fit_threshold(y: np.ndarray, probs: np.ndarray, index: int, target: float,
                  confidence: float | None = None, batch: int | None = None) -> float:
    """The threshold on class `index`'s probability: without `confidence`, the largest t such that at
    least `target` of its images here have p >= t (holds on these images only); with it, the
    conformal one (`rank`): recall >= target on new images of the same population (on each batch of
    `batch` of them, when given) with probability >= confidence."""
    scores = np.sort(np.asarray(probs)[np.asarray(y) == index, index])[::-1]
    if len(scores) == 0:
        raise ConfigError("--target-recall: the validation split has no image of that class")
    if confidence is None:
        k = max(1, math.ceil(target * len(scores) - 1e-9))
    else:
        k = rank(len(scores), target, confidence, batch)[0]
    return float(scores[k - 1])


def choose(y_val: np.ndarray, p_val: np.ndarray, classes, spec: str, confidence: float | None = None,
           batch: int | None = None) -> OperatingPoint:
    """The bundle's `operating_point` entry, fitted on the validation split (conformal with
    `confidence`, over batches of `batch` images when given: see `fit_threshold`)."""
    name, target = parse_target(spec)
    if name not in classes:
        raise ConfigError(f"--target-recall: unknown class {name!r}; classes: {list(classes)}")
    i = list(classes).index(name)
    t = fit_threshold(y_val, p_val, i, target, confidence, batch)
    pos = np.asarray(y_val) == i
    val_recall = float((decide(p_val, i, t)[pos] == i).mean())
    conformal = {} if confidence is None else {
        "rule": "conformal", "confidence": confidence, "batch": batch,
        "confidence_reached": rank(int(pos.sum()), target, confidence, batch)[1]}
    return OperatingPoint(class_name=name, threshold=t, target_recall=target, val_recall=val_recall,
                          val_images=int(pos.sum()), **conformal)


def op_index(op: OperatingPoint | None, classes) -> tuple[int | None, float | None]:
    """(class index, threshold) of an operating point, or (None, None)."""
    if op is None:
        return None, None
    return list(classes).index(op.class_name), float(op.threshold)
