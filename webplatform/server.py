"""uvicorn's HTTP/1.1 protocol (httptools) with a deadline and a size cap on request headers.

The web process serves HTTP with uvloop and httptools (llhttp, C): against the pure-Python
h11 on asyncio's own loop they take ~6 ms off a 275 KB API request at one client and ~8%
more requests/s at 16 (docs/benchmarks.md, "Event loop and HTTP parser"). uvicorn's
httptools protocol bounds neither the size of a request's headers (h11 had
``--h11-max-incomplete-event-size``; llhttp parses headers of any length) nor the time a
client takes to send them (``--timeout-keep-alive`` is armed only once a response is
complete): a connection that sends one header line every few seconds, or nothing at all
after connecting, would be kept forever, and one that sends megabytes of headers would be
buffered. No ASGI middleware can help (the application is called only once the headers are
complete), so both limits live in the protocol:

    uvicorn webplatform.asgi:application --loop uvloop \
        --http webplatform.server:HeaderLimitsHttpToolsProtocol

- the deadline (``HTTP_HEADER_TIMEOUT_SECONDS``, default 10) starts when the connection
  opens and again after each response; when it passes before a request's headers are
  complete the client gets ``408 Request Timeout`` and the connection is closed;
- the size cap (``HTTP_HEADER_MAX_BYTES``, default 16384: the request line and every header
  line) is checked as bytes arrive and again on the parsed headers; past it the client gets
  ``431 Request Header Fields Too Large`` and the connection is closed, before the
  application sees the request.

Bodies have their own limits (``webplatform.asgi_limits``). This module imports neither
Django nor the project, so uvicorn can load it before the application.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def _refusal(status: bytes, message: bytes) -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\n"
        b"content-type: text/plain; charset=utf-8\r\n"
        b"content-length: " + str(len(message)).encode() + b"\r\n"
        b"connection: close\r\n\r\n" + message
    )


_TIMEOUT_RESPONSE = _refusal(b"408 Request Timeout", b"Request headers took too long.")
_TOO_LARGE_RESPONSE = _refusal(
    b"431 Request Header Fields Too Large", b"Request headers are too large."
)


def header_timeout_seconds() -> float:
    return float(os.environ.get("HTTP_HEADER_TIMEOUT_SECONDS", "10"))


def header_max_bytes() -> int:
    return int(os.environ.get("HTTP_HEADER_MAX_BYTES", "16384"))


class HeaderLimitsHttpToolsProtocol(HttpToolsProtocol):
    header_timeout_s = header_timeout_seconds()
    header_max_bytes = header_max_bytes()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        # Between a response (or the connection's start) and the end of the next request's
        # headers: what arrives is the request line and headers, nothing else.
        self._awaiting_headers = True
        self._header_bytes = 0  # received while awaiting headers
        self._parsed_header_bytes = 0  # request line and header lines, as parsed

    def _await_headers(self) -> None:
        self._awaiting_headers = True
        self._header_bytes = 0
        self._parsed_header_bytes = 0
        self._disarm_header_deadline()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_deadline)

    def _disarm_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _refuse(self, response: bytes) -> None:
        self._disarm_header_deadline()
        self._awaiting_headers = False
        if not self.transport.is_closing():
            self.transport.write(response)
            self.transport.close()

    def _header_deadline(self) -> None:
        self._header_timer = None
        if self._awaiting_headers:
            self._refuse(_TIMEOUT_RESPONSE)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        if self._awaiting_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        # Still awaiting headers after this data: everything received so far was headers
        # (a chunk that completed them may also carry body bytes: on_headers_complete
        # checks the parsed size instead).
        if self._awaiting_headers and self._header_bytes > self.header_max_bytes:
            self._refuse(_TOO_LARGE_RESPONSE)

    def on_message_begin(self) -> None:
        self._parsed_header_bytes = 0  # each request's own (pipelined ones too)
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._parsed_header_bytes += len(url) + 16  # method, version, spaces, CRLF
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._parsed_header_bytes += len(name) + len(value) + 4  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._parsed_header_bytes > self.header_max_bytes:
            self._refuse(_TOO_LARGE_RESPONSE)
            return
        self._awaiting_headers = False
        self._disarm_header_deadline()  # headers complete: the request runs
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self.cycle is None:  # refused at its headers: nothing runs, nothing to feed
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self.cycle is None:
            return
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)
