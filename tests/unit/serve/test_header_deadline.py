"""Clients that trickle a partial request header are cut off (issue 17, item 6): real sockets
against a real uvicorn server on loopback. Headers that arrive in time, and keep-alive connections
used for longer than the deadline, are served as before."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

import pytest

from covid_cxr.serve.settings import ServeSettings
from covid_cxr.serve.testing import running_server

DEADLINE_S = 1.0


@pytest.fixture(scope="module")
def server(tiny_models):
    with running_server(ServeSettings(models=tiny_models, header_timeout_s=DEADLINE_S)) as base:
        yield base


def _connect(base: str) -> socket.socket:
    u = urlsplit(base)
    s = socket.create_connection((u.hostname, u.port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _closed(s: socket.socket) -> bool:
    try:
        s.setblocking(False)
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True
    finally:
        s.setblocking(True)


def _response(s: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        assert chunk, "connection closed before a response"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int([ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")][0])
    while len(body) < length:
        body += s.recv(4096)
    return head.split(b"\r\n")[0]


def test_trickled_headers_are_closed_after_the_deadline(server):
    socks = [_connect(server) for _ in range(20)]
    for s in socks:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    t0 = time.monotonic()
    while time.monotonic() - t0 < DEADLINE_S * 3:
        for s in socks:  # one byte now and then: uvicorn's keep-alive timer never fires on this
            try:
                s.sendall(b"X")
            except OSError:
                pass
        time.sleep(0.2)
    assert all(_closed(s) for s in socks)
    good = _connect(server)  # the server is still answering
    good.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _response(good).endswith(b"200 OK")
    for s in [good, *socks]:
        s.close()


def test_headers_sent_slowly_but_in_time_and_long_keep_alive_are_served(server):
    s = _connect(server)
    for part in (b"GET /healthz HT", b"TP/1.1\r\nHo", b"st: x\r\n", b"\r\n"):
        s.sendall(part)
        time.sleep(DEADLINE_S / 5)
    assert _response(s).endswith(b"200 OK")
    for _ in range(3):  # three requests over longer than one deadline: each gets its own
        time.sleep(DEADLINE_S * 0.6)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _response(s).endswith(b"200 OK")
    s.close()
