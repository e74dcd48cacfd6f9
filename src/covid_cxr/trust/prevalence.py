"""A site's class prevalence from its unlabelled films (label shift).

A site head is fitted with classes balanced, so it answers as if every class were equally common.
A site whose films are 7 % Viral Pneumonia then sees too many of them called so (benchmarks/
site_label_shift.py, docs/results/site.md). EM over the calibrated answers estimates the site's
prevalence (Saerens, Latinne & Decaestecker 2002; calibration first: Alexandari et al. 2020), and the
prior correction moves each answer to it. Written here in a few lines rather than adding QuaPy, whose
EMQ is this loop but whose install brings pandas, xlrd and ucimlrepo.
"""

from __future__ import annotations

import numpy as np

FLOOR = 1e-3  # no class's prior goes below this: a shift by log(0) would remove the class for good


def estimate_prevalence(probs: np.ndarray, train_prior: np.ndarray, tol: float = 1e-8,
                        max_iter: int = 1000) -> np.ndarray:
    """The class prevalence of the films behind `probs` (N x C calibrated probabilities of a model
    whose training prior was `train_prior`), by EM: reweight each answer by prior / training prior,
    renormalise, take the mean as the new prior, until it stops moving."""
    p = np.asarray(probs, np.float64)
    base = np.clip(np.asarray(train_prior, np.float64), 1e-12, None)
    prior = base.copy()
    for _ in range(max_iter):
        w = p * (prior / base)
        w /= w.sum(axis=1, keepdims=True)
        new = w.mean(axis=0)
        if np.abs(new - prior).max() < tol:
            return new
        prior = new
    return prior


def logit_shift(train_prior: np.ndarray, site_prior: np.ndarray, floor: float = FLOOR) -> np.ndarray:
    """What to add to the tempered logits (logits / T) so the answers carry the site's prior."""
    site = np.clip(np.asarray(site_prior, np.float64), floor, None)
    return np.log(site / site.sum()) - np.log(np.clip(np.asarray(train_prior, np.float64), floor, None))
