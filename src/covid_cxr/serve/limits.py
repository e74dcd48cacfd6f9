"""How much decoding the server does at once: a pixel budget shared by every request.

A compressed image says nothing about what decoding it costs (a 48 kB PNG can be 50 megapixels),
so the cost is counted in pixels, read from the header before any pixel is decoded. Decodes run in
worker threads; each holds its image's pixels from the budget while it decodes, and waits while
the others hold too much. One image larger than the whole budget still runs, alone.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from covid_cxr.data.decode import DEFAULT_MAX_PIXELS, load_for_model


class PixelBudget:
    """A weighted semaphore for threads: `hold(n)` waits until n more pixels fit in `capacity`."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.in_use = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int):
        n = min(max(int(pixels), 1), self.capacity)
        with self._cond:
            self._cond.wait_for(lambda: self.in_use + n <= self.capacity)
            self.in_use += n
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= n
                self._cond.notify_all()


@dataclass(frozen=True)
class DecodeLimits:
    """What any decode on the server may cost: a pixel cap per image and the shared budget."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    budget: PixelBudget | None = field(default=None, compare=False)

    def load(self, data: bytes, height: int, width: int) -> np.ndarray:
        """Encoded image -> float32 H x W in [0, 1] (blocking; waits for its share of the budget)."""
        return load_for_model(data, height, width, self.max_pixels, self.budget.hold if self.budget else None)
