"""ASGI middleware in front of the app: metrics, concurrency limit and body limit, before any parsing.

Pure ASGI (not BaseHTTPMiddleware) so it adds microseconds, and so it can refuse a request before
reading its body: a saturated server answers 503 at once, and an oversized body is cut off at the
limit whether or not the client sent Content-Length (chunked uploads are counted as they arrive).
"""

from __future__ import annotations

import json
import time

from covid_cxr.serve.metrics import Metrics

# After the limit, the rest of an oversized body is read and thrown away (up to this much more)
# so that the client, still sending, gets to read the 413 instead of a reset connection.
DRAIN_BYTES = 64 * 1024 * 1024


def endpoint_of(path: str) -> str:
    """A small fixed set of endpoint labels for metrics (never the raw path: unbounded cardinality)."""
    if path.startswith("/v1/models/"):
        if path.endswith(":predict"):
            return "tfs_predict"
        if path.endswith("/metadata"):
            return "tfs_metadata"
        return "tfs_status"
    if path.startswith("/v2"):
        return "oip_infer" if path.endswith("/infer") else "oip"
    return {"/api/v1/predict": "upload_predict", "/api/v1/models": "models", "/healthz": "healthz",
            "/readyz": "readyz", "/metrics": "metrics", "/": "web"}.get(
        path, "static" if path.startswith("/static/") else "other")


def is_predict(path: str) -> bool:
    return (path == "/api/v1/predict" or (path.startswith("/v1/models/") and path.endswith(":predict"))
            or (path.startswith("/v2/models/") and path.endswith("/infer")))


async def send_json(send, status: int, payload: dict, headers: list | None = None) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(self, app, metrics: Metrics, max_body_bytes: int, max_concurrency: int):
        self.app = app
        self.metrics = metrics
        self.max_body = max_body_bytes
        self.max_concurrency = max_concurrency
        self.inflight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        state = scope.setdefault("state", {})
        state["t0"] = t0
        path = scope["path"]
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        predict = is_predict(path)
        try:
            if predict and self.inflight >= self.max_concurrency:
                self.metrics.rejected.labels("busy").inc()
                await send_json(send_status, 503, {"error": f"server busy: {self.max_concurrency} predict "
                                                   "requests in flight; retry later"}, [(b"retry-after", b"1")])
                return
            if predict:
                self.inflight += 1
                self.metrics.inflight.inc()
            try:
                if scope["method"] in ("POST", "PUT", "PATCH"):
                    body, refusal = await self._read_body(scope, receive)
                    if refusal is not None:
                        self.metrics.rejected.labels(refusal).inc()
                        if refusal == "too_large":
                            await send_json(send_status, 413, {"error": f"request body larger than "
                                                               f"{self.max_body} bytes"},
                                            [(b"connection", b"close")])
                        return  # client gone: nothing to answer
                    receive = _replay(body, receive)
                await self.app(scope, receive, send_status)
            finally:
                if predict:
                    self.inflight -= 1
                    self.metrics.inflight.dec()
        finally:
            self.metrics.observe_request(endpoint_of(path), state.get("model", ""), status[0],
                                         time.perf_counter() - t0)

    async def _read_body(self, scope, receive) -> tuple[bytes, str | None]:
        declared = None
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    declared = None
        if declared is not None and declared > self.max_body + DRAIN_BYTES:
            return b"", "too_large"  # not worth draining: answer now, the connection closes
        chunks, size, too_large = [], 0, declared is not None and declared > self.max_body
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", "disconnect"
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                too_large = True
                chunks = []
            if not too_large:
                chunks.append(chunk)
            if not message.get("more_body", False) or size > self.max_body + DRAIN_BYTES:
                break
        return (b"", "too_large") if too_large else (b"".join(chunks), None)


def _replay(body: bytes, receive):
    """The body, read once by the guard, handed to the app as if it came off the wire."""
    done = False

    async def replay():
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
