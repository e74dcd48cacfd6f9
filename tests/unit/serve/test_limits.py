"""The pixel budget bounds the pixels decoded at once across request threads."""

from __future__ import annotations

import threading
import time


def test_pixel_budget_bounds_concurrent_decodes():
    from covid_cxr.serve.limits import PixelBudget

    budget, peak, lock = PixelBudget(100), [0], threading.Lock()

    def work(n):
        with budget.hold(n):
            with lock:
                peak[0] = max(peak[0], budget.in_use)
            time.sleep(0.01)

    threads = [threading.Thread(target=work, args=(n,)) for n in (60, 60, 30, 200, 10) * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] <= 100 and budget.in_use == 0
