"""Prometheus metrics in a per-app registry, so several apps (tests, benchmarks) never share counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Request counts/latency by endpoint, model and status; batch sizes; in-flight and loaded models."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("covid_cxr_requests", "HTTP requests answered",
                                ["endpoint", "model", "status"], registry=r)
        self.latency = Histogram("covid_cxr_request_latency_seconds", "HTTP request latency (server side)",
                                 ["endpoint", "model", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("covid_cxr_batch_size", "images per ONNX Runtime call",
                                    ["model", "version"], buckets=BATCH_BUCKETS, registry=r)
        self.inference = Histogram("covid_cxr_inference_seconds", "time of one ONNX Runtime call",
                                   ["model", "version"], buckets=LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("covid_cxr_inflight_predict_requests", "predict requests being handled",
                              registry=r)
        self.rejected = Counter("covid_cxr_rejected", "requests refused before reaching a handler",
                                ["reason"], registry=r)
        self.loaded = Gauge("covid_cxr_loaded_models", "model versions loaded in ONNX Runtime", registry=r)
        self.load_failures = Counter("covid_cxr_model_load_failures", "model versions that failed to load",
                                     ["model", "version"], registry=r)

    def observe_request(self, endpoint: str, model: str, status: int, seconds: float) -> None:
        s = str(status)
        self.requests.labels(endpoint, model, s).inc()
        self.latency.labels(endpoint, model, s).observe(seconds)

    def observe_batch(self, model: str, version: int, size: int, seconds: float) -> None:
        v = str(version)
        self.batch_size.labels(model, v).observe(size)
        self.inference.labels(model, v).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
