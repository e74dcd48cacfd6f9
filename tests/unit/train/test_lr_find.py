"""The LR suggestion: where the smoothed loss falls fastest, before its minimum - never on the hump."""

from __future__ import annotations

import numpy as np

from covid_cxr.train.lr_find import steepest_descent


def test_the_suggestion_is_on_the_falling_side_not_the_hump():
    lrs = np.logspace(-6, 0, 100)
    x = np.log10(lrs)
    # falls fastest around 1e-3, minimum near 1e-2, then climbs steeply (the hump)
    loss = 1.0 - 0.8 / (1 + np.exp(-(x + 3) * 4)) + np.where(x > -2, (x + 2) ** 2 * 3, 0)
    best = steepest_descent(lrs, loss)
    assert best is not None and 3e-4 < best < 3e-3
    assert best < lrs[int(np.argmin(loss))]


def test_no_suggestion_when_the_loss_never_falls():
    lrs = np.logspace(-6, 0, 60)
    assert steepest_descent(lrs, np.linspace(1, 3, 60)) is None
    assert steepest_descent(lrs[:4], [1, 0.9, 0.8, 0.7]) is None  # too short to judge
