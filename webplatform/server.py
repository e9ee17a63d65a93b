"""uvicorn's HTTP/1.1 protocol (h11) with a deadline on request headers.

The web process runs it on uvloop (``--loop uvloop``, docs/benchmarks.md "Event loop and
HTTP parser"). Not on httptools, though faster: uvicorn's httptools protocol bounds no
header size, and a cap added in a subclass could be bypassed (headers of a pipelined
request arriving while another runs, chunked trailers: unbounded memory, found by review),
while h11 bounds every incomplete event (``--h11-max-incomplete-event-size``).

uvicorn (0.54, h11) bounds the size of a request's headers (``--h11-max-incomplete-event-size``)
and the idle time between two requests on a kept-alive connection (``--timeout-keep-alive``,
armed only once a response is complete), but nothing bounds the time a client takes to
send its headers: a connection that sends one header line every few seconds, or nothing at
all after connecting, is kept forever. No ASGI middleware can help (the application is
called only once the headers are complete), so the deadline lives in the protocol:

    uvicorn webplatform.asgi:application --http webplatform.server:HeaderDeadlineH11Protocol

The deadline (``HTTP_HEADER_TIMEOUT_SECONDS``, default 10) starts when the connection opens
and again after each response; when it passes before a request's headers are complete the
client gets ``408 Request Timeout`` and the connection is closed. Bodies have their own
deadlines (``webplatform.asgi_limits``). This module imports neither Django nor the project,
so uvicorn can load it before the application.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: 30\r\n"
    b"connection: close\r\n\r\n"
    b"Request headers took too long."
)


def header_timeout_seconds() -> float:
    return float(os.environ.get("HTTP_HEADER_TIMEOUT_SECONDS", "10"))


class HeaderDeadlineH11Protocol(H11Protocol):
    header_timeout_s = header_timeout_seconds()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_deadline)

    def _disarm_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline(self) -> None:
        self._header_timer = None
        # IDLE: the client has not finished the headers of its next request.
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.write(_TIMEOUT_RESPONSE)
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:
            self._disarm_header_deadline()  # headers complete: the request runs

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)
