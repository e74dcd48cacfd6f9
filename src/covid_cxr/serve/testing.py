"""A real uvicorn server on loopback, in a background thread: for tests and quick experiments.

The socket is bound before the server starts (port 0: the kernel picks a free one), so there is no
race between choosing a port and listening on it.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from covid_cxr.serve.settings import ServeSettings


@contextmanager
def running_server(settings: ServeSettings, ready_timeout: float = 60.0, wait_ready: bool = True) -> Iterator[str]:
    """Yield the base URL (http://127.0.0.1:PORT) of a server running `create_app(settings)`."""
    import httpx
    import uvicorn

    from covid_cxr.serve.app import create_app
    from covid_cxr.serve.transport import http_protocol

    app = create_app(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=2, http=http_protocol(settings.header_timeout_s))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name=f"uvicorn-{port}")
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        if wait_ready:
            while httpx.get(base + "/readyz", timeout=5).status_code != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError("test server loaded no model in time")
                time.sleep(0.05)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
