"""A site's prevalence by EM (trust/prevalence.py): it finds the prior behind calibrated answers,
leaves an unshifted site where it was, and its correction never removes a class for good."""

import numpy as np
import pytest

from covid_cxr.trust.prevalence import FLOOR, estimate_prevalence, logit_shift


def _answers(prior, n=4000, sep=1.5, seed=0):
    """Calibrated posteriors of films drawn with class shares `prior`, from a model trained under a
    uniform prior: Gaussian class scores, softmax of the exact log-likelihoods."""
    rng = np.random.default_rng(seed)
    k = len(prior)
    y = rng.choice(k, n, p=prior)
    z = rng.normal(0, 1, (n, k)) + sep * np.eye(k)[y]
    ll = -0.5 * ((z[:, None, :] - sep * np.eye(k)[None]) ** 2).sum(-1)
    p = np.exp(ll - ll.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def test_em_finds_the_sites_prior_and_leaves_a_balanced_site_balanced():
    uniform = np.full(3, 1 / 3)
    skewed = np.array([0.25, 0.68, 0.07])
    est = estimate_prevalence(_answers(skewed), uniform)
    assert np.abs(est - skewed).max() < 0.03
    naive = _answers(skewed).mean(0)  # the mean answer alone is pulled towards the training prior
    assert np.abs(naive - skewed).max() > np.abs(est - skewed).max()
    assert np.abs(estimate_prevalence(_answers(uniform, seed=1), uniform) - uniform).max() < 0.03


def test_the_shift_is_zero_without_label_shift_and_floored_for_an_absent_class():
    uniform = np.full(3, 1 / 3)
    assert np.allclose(logit_shift(uniform, uniform), 0)
    shift = logit_shift(uniform, np.array([0.5, 0.5, 0.0]))
    assert np.isfinite(shift).all() and shift[2] == pytest.approx(np.log(FLOOR / (1 + FLOOR)) - np.log(1 / 3))
    assert shift[0] > 0 > shift[2]
