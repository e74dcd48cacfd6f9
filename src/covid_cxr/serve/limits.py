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


def return_large_frees_to_the_os(threshold: int = 4 * 1024 * 1024) -> bool:
    """glibc only: serve allocations of `threshold` bytes or more from mmap, always.

    By default glibc raises its mmap threshold after each large free (up to 32 MB), so the next
    decoded image lands in one of its per-thread heaps, and that memory stays with the process
    after the request: a burst of large images left a server at 3 GB. A fixed threshold turns
    off that adjustment; image-sized buffers then go back to the OS when freed. Returns whether
    it applied (False on other C libraries)."""
    import ctypes
    import ctypes.util

    m_mmap_threshold = -3  # from glibc's malloc.h
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(m_mmap_threshold, threshold))
    except (OSError, AttributeError):
        return False
