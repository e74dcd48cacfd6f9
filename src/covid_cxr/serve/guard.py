"""ASGI middleware in front of the app: metrics, body limit and timeout, admission, last-resort errors.

Pure ASGI (not BaseHTTPMiddleware) so it adds microseconds, and so it reads the body itself before
the app sees it:
- the body must arrive within `body_timeout_s` (408 and the connection closed), and is cut off at
  `max_body_bytes` whether or not the client sent Content-Length (413);
- only then is a predict request admitted against `max_concurrency` (503 at once when full): a
  client that sends headers and stalls holds a socket, never a slot, so 64 stalled clients cannot
  lock the others out;
- anything the app raises unexpectedly becomes a JSON 500 sent here (logged with its traceback),
  so the connection stays usable: uvicorn would otherwise drop a keep-alive connection after the
  500 without saying `Connection: close`, and the client's next good request on it would fail.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

from covid_cxr.serve.metrics import Metrics

log = logging.getLogger("covid_cxr.serve")
# After the limit, the rest of an oversized body is read and thrown away (up to this much more)
# so that the client, still sending, gets to read the 413 instead of a reset connection.
DRAIN_BYTES = 64 * 1024 * 1024
CLOSE = [(b"connection", b"close")]


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
    def __init__(self, app, metrics: Metrics, max_body_bytes: int, max_concurrency: int,
                 body_timeout_s: float = 30.0, model_label: Callable[[str], str] = lambda name: name):
        self.app = app
        self.metrics = metrics
        self.model_label = model_label  # a client's model name -> a bounded metrics label
        self.max_body = max_body_bytes
        self.max_concurrency = max_concurrency
        self.body_timeout = body_timeout_s
        self.inflight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        state = scope.setdefault("state", {})
        state["t0"] = t0
        status = [0]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, send_status, status)
        finally:
            self.metrics.observe_request(endpoint_of(scope["path"]), self.model_label(state.get("model", "")),
                                         status[0] or 500,
                                         time.perf_counter() - t0)

    async def _handle(self, scope, receive, send, status: list[int]) -> None:
        try:
            body, refusal = await asyncio.wait_for(self._read_body(scope, receive), self.body_timeout)
        except asyncio.TimeoutError:
            body, refusal = b"", "timeout"
        if refusal is not None:
            await self._refuse(send, refusal)
            return
        predict = is_predict(scope["path"])
        if predict and self.inflight >= self.max_concurrency:
            self.metrics.rejected.labels("busy").inc()
            await send_json(send, 503, {"error": f"server busy: {self.max_concurrency} predict requests in "
                                        "flight; retry later"}, [(b"retry-after", b"1")])
            return
        if predict:
            self.inflight += 1
            self.metrics.inflight.inc()
        try:
            await self._call_app(scope, _replay(body, receive), send, status)
        finally:
            if predict:
                self.inflight -= 1
                self.metrics.inflight.dec()

    async def _refuse(self, send, refusal: str) -> None:
        self.metrics.rejected.labels(refusal).inc()
        if refusal == "too_large":
            await send_json(send, 413, {"error": f"request body larger than {self.max_body} bytes"}, CLOSE)
        elif refusal == "timeout":
            await send_json(send, 408, {"error": f"request body not received within {self.body_timeout:g} s"},
                            CLOSE)
        # "disconnect": the client is gone, nothing to answer

    async def _call_app(self, scope, receive, send, status: list[int]) -> None:
        try:
            await self.app(scope, receive, send)
        except Exception:
            if status[0]:  # the response has begun: all we can do is let the server drop the connection
                raise
            log.exception("unexpected error on %s %s", scope.get("method"), scope.get("path"))
            await send_json(send, 500, {"error": "internal server error (logged on the server)"})

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
