"""The HTTP transport: uvicorn's h11 protocol with a deadline on request headers.

uvicorn times out idle keep-alive connections but not a request whose headers are still arriving:
a client trickling a partial header (one byte now and then) holds its socket forever, and 1,100
of them exhaust `ulimit -n 1024` so `accept()` fails for everyone. Here every request's headers
must be complete within `header_timeout_s` of the connection opening (or of the previous response
on a keep-alive connection); otherwise the connection is closed. The body has its own deadline
(`body_timeout_s`, in the Guard middleware).
"""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderDeadlineProtocol(H11Protocol):
    """H11Protocol that closes a connection whose request headers are not complete in time."""

    header_timeout_s: float = 10.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._responses = 0
        self._header_timer = None
        self._arm_header_deadline()

    def _arm_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_deadline, self._responses)

    def _header_deadline(self, responses_then: int) -> None:
        """Close if no new request's headers arrived since the deadline was set (h11 still waits for them)."""
        waiting = self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)
        if responses_then == self._responses and waiting and not self.transport.is_closing():
            self.transport.close()

    def on_response_complete(self) -> None:
        self._responses += 1
        self._arm_header_deadline()  # the next request on this connection gets its own deadline
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)


def http_protocol(header_timeout_s: float) -> type[HeaderDeadlineProtocol]:
    """The protocol class to hand uvicorn (`http=`), with this deadline."""
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout_s": header_timeout_s})
