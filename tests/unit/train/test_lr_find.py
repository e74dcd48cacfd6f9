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


def test_a_real_curve_with_a_rising_start_still_gets_a_suggestion():
    """Lightning's smoothed losses of a 30-step test on 60 real X-rays: the start climbs while the
    smoothing settles, the fall comes later, then the loss explodes."""
    losses = [0.571, 0.744, 0.842, 0.896, 0.93, 0.969, 0.987, 1.003, 1.012, 1.022, 1.025, 1.026, 1.021, 1.013,
              0.998, 0.979, 0.95, 0.908, 0.864, 0.822, 0.776, 0.742, 0.733, 0.696, 0.854, 4.097, 3.996, 3.844,
              5.361, 28.087]
    lrs = np.logspace(-6, 0, len(losses))
    best = steepest_descent(lrs, losses)
    assert best is not None and lrs[14] <= best < lrs[23]  # on the falling stretch, before the minimum
