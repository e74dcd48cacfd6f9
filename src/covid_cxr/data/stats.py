"""Normalisation statistics, from the training split only (no peeking at val/test pixels)."""

from __future__ import annotations

import math

from covid_cxr.core.errors import DataError


def mean_std(records) -> tuple[float, float]:
    """Pixel-weighted mean and std of [0, 1] grayscale, from each record's stored pixel moments."""
    n = sum(r.width * r.height for r in records)
    if n == 0:
        raise DataError("no training images to compute normalisation statistics from")
    m = sum(r.pixel_mean * r.width * r.height for r in records) / n
    sq = sum(r.pixel_sq_mean * r.width * r.height for r in records) / n
    return m, math.sqrt(max(sq - m * m, 1e-12))
