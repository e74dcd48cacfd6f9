"""The serving monitor: per loaded model version, a bounded window of its latest answers (scores
only: probabilities, ood_score, in_distribution; never images), tested against the bundle's
`site_reference` with the same tests as `covid-cxr site check` (no image statistics: the server
keeps no pixels).

The request path only appends its rows to a `collections.deque(maxlen=window)` (a C-level append
of row views, about a microsecond); the tests run when someone looks (Prometheus scrape, the
metadata route, the web page), at most once per new answer, off the critical path."""

from __future__ import annotations

from collections import deque

import numpy as np

from covid_cxr.bundle.schema import SiteReference
from covid_cxr.site.reference import Sample
from covid_cxr.site.shift import ALPHA, MIN_IMAGES, SHIFT, compare, summary_words


class ShiftMonitor:
    """Rolling window of one model version's answers and its shift verdict."""

    def __init__(self, reference: SiteReference | None, classes: list[str], window: int, alpha: float = ALPHA):
        self.reference = reference
        self.classes = list(classes)
        self.window = int(window)
        self.alpha = alpha
        self._rows: deque = deque(maxlen=max(1, self.window))
        self._seen = 0
        self._cached: tuple[int, dict] | None = None

    def append(self, rows: np.ndarray) -> None:
        """The request path's only work: the answer rows (n x classes [+ ood_score, in_distribution])."""
        self._rows.extend(rows)
        self._seen += len(rows)

    def snapshot(self) -> dict:
        """The window's verdict, p-value, OOD rate and class mix (JSON-ready; recomputed only when
        answers arrived since the last call)."""
        seen = self._seen
        if self._cached is not None and self._cached[0] == seen:
            return self._cached[1]
        rows = np.array(self._rows.copy(), np.float64)  # deque.copy: atomic, never "mutated during iteration"
        out = self._summarise(rows)
        self._cached = (seen, out)
        return out

    def _summarise(self, rows: np.ndarray) -> dict:
        c = len(self.classes)
        n = len(rows)
        out = {"window": self.window, "n": n, "answers_seen": self._seen, "min_images": MIN_IMAGES,
               "alpha": self.alpha, "verdict": None, "p_value": None, "ood_rate": None,
               "class_mix": {k: None for k in self.classes}, "signals": [], "summary": None}
        if n:
            mix = np.bincount(rows[:, :c].argmax(1), minlength=c) / n
            out["class_mix"] = {k: float(v) for k, v in zip(self.classes, mix)}
            if rows.shape[1] == c + 2:
                out["ood_rate"] = float((rows[:, c + 1] < 0.5).mean())
        if self.reference is None:
            out["summary"] = "the bundle has no site_reference: nothing to compare with"
            return out
        ood = rows[:, c] if n and rows.shape[1] == c + 2 else None
        result = compare(self.reference, Sample(rows[:, :c] if n else np.zeros((0, c)), ood), self.classes,
                         self.alpha, images=False)
        out.update({"verdict": result.verdict, "p_value": result.p_value if result.signals else None,
                    "signals": [{"name": s.name, "p_adjusted": s.p_adjusted, "effect": s.effect, "moved": s.moved}
                                for s in result.signals], "summary": summary_words(result)})
        return out

    @property
    def shifted(self) -> bool:
        return self.snapshot()["verdict"] == SHIFT


class MonitorCollector:
    """Prometheus collector: the gauges are computed at scrape time from every loaded model's
    monitor (`monitors()` -> [(name, version, ShiftMonitor)])."""

    def __init__(self, monitors):
        self.monitors = monitors

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        labels = ["model", "version"]
        p = GaugeMetricFamily("covid_cxr_shift_p_value", "site monitor: smallest Holm-adjusted p-value of the "
                              "window against the bundle's reference (1: nothing tested)", labels=labels)
        shifted = GaugeMetricFamily("covid_cxr_shift_detected", "site monitor: 1 when the window has shifted",
                                    labels=labels)
        ood = GaugeMetricFamily("covid_cxr_window_ood_rate", "site monitor: share of the window the OOD gate rejects",
                                labels=labels)
        size = GaugeMetricFamily("covid_cxr_window_answers", "site monitor: answers in the window", labels=labels)
        mix = GaugeMetricFamily("covid_cxr_window_class_share", "site monitor: share of the window predicted as "
                                "each class", labels=[*labels, "class"])
        for name, version, m in self.monitors():
            s, v = m.snapshot(), str(version)
            p.add_metric([name, v], 1.0 if s["p_value"] is None else s["p_value"])
            shifted.add_metric([name, v], float(s["verdict"] == SHIFT))
            size.add_metric([name, v], s["n"])
            if s["ood_rate"] is not None:
                ood.add_metric([name, v], s["ood_rate"])
            for k, share in s["class_mix"].items():
                if share is not None:
                    mix.add_metric([name, v, k], share)
        yield from (p, shifted, ood, size, mix)
