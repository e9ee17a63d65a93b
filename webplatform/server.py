"""uvicorn's HTTP/1.1 protocol (httptools) with a deadline and a size cap on request headers.

The web process serves HTTP with uvloop and httptools (llhttp, C): against the pure-Python
h11 they take ~6 ms off a 275 KB API request at one client (docs/benchmarks.md, "Event
loop and HTTP parser"). uvicorn's httptools protocol bounds neither the size of what the
parser buffers (h11 had ``--h11-max-incomplete-event-size``; httptools keeps appending an
unfinished URL, header or trailer to memory) nor the time a client takes to send its
headers (``--timeout-keep-alive`` is armed only once a response is complete). No ASGI
middleware can help (the application is called only once the headers are complete), so
both limits live in the protocol:

    uvicorn webplatform.asgi:application --loop uvloop \
        --http webplatform.server:HeaderLimitsHttpToolsProtocol

- size (``HTTP_HEADER_MAX_BYTES``, default 16384): the bytes received since the parser last
  made progress (a request's headers complete, a piece of body, a request complete) may
  not pass the cap, whatever they are: a header block, one endless header line or URL, a
  chunked body's trailers, the headers of a pipelined request arriving while another
  runs; and a request's parsed request line and headers may not either (a block that
  arrives whole in one read). Past it: ``431 Request Header Fields Too Large``, the
  connection closed, nothing more parsed or run (a pipelined request behind it included);
- time (``HTTP_HEADER_TIMEOUT_SECONDS``, default 10): from the connection's start, and
  after each response when no other request runs, to the next request's complete
  headers; past it: ``408 Request Timeout`` and the connection closed.

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
_REQUEST_LINE_OVERHEAD = 16  # method, spaces, "HTTP/1.1", CRLF


def header_timeout_seconds() -> float:
    return float(os.environ.get("HTTP_HEADER_TIMEOUT_SECONDS", "10"))


def header_max_bytes() -> int:
    return int(os.environ.get("HTTP_HEADER_MAX_BYTES", "16384"))


class HeadWithBody(asyncio.Transport):
    """The transport one request's response is written to: a head announcing a body
    (``Content-Length`` above 0) is held until the body's first bytes and written with
    them, one write, or at the event loop's next turn if they have not come by then.

    uvicorn writes a response's head as soon as the application sends it, and the body
    when the application sends that; Django sends the two one after the other. Two
    writes wake the client twice: on a machine whose cores are busy, the client woken by
    the head runs on the web process's core until it has read it, and the body waits
    (``benchmarks/request_stages.py``: ~1.1 ms between the head and the body at one
    client; docs/benchmarks.md, "A request's stages; a response's head with its body").
    Streamed responses (chunked: no ``Content-Length``) are written as they come, and so is
    the head of a ``HEAD`` request (no body follows it).

    uvicorn's request cycle uses ``write``, ``is_closing`` and ``close`` of its transport;
    everything else of the connection is the protocol's, on the real transport.
    """

    def __init__(self, transport: asyncio.Transport, cycle: Any, loop: asyncio.AbstractEventLoop):
        super().__init__()
        self._transport = transport
        self._cycle: Any = cycle  # until its head is seen (no reference cycle after)
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview[Any]) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self._transport.writelines((held, data))  # one send (uvloop: writev, no copy)
            return
        cycle = self._cycle
        if cycle is not None and cycle.response_started:
            self._cycle = None  # the first write once the response started: its head
            if (
                cycle.chunked_encoding is False
                and cycle.expected_content_length > 0
                and cycle.scope["method"] != "HEAD"
            ):
                self._held = bytes(data)
                self._loop.call_soon(self.flush)
                return
        self._transport.write(data)

    def flush(self) -> None:
        """Write the held head, if any (the body did not come in the same turn)."""
        if self._held is not None:
            held, self._held = self._held, None
            if not self._transport.is_closing():
                self._transport.write(held)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)


class HeaderLimitsHttpToolsProtocol(HttpToolsProtocol):
    header_timeout_s = header_timeout_seconds()
    header_max_bytes = header_max_bytes()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._awaiting_headers = False  # the deadline runs for the next request's headers
        self._unparsed = 0  # bytes received since the parser last made progress
        self._header_bytes = 0  # the current request's request line and headers, parsed
        self._refused = False  # once refused, nothing more is parsed or run

    # The deadline.
    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._awaiting_headers = True
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_deadline)

    def _disarm_header_deadline(self) -> None:
        self._awaiting_headers = False
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline(self) -> None:
        self._header_timer = None
        if self._awaiting_headers:
            self._refuse(_TIMEOUT_RESPONSE)

    def _refuse(self, response: bytes) -> None:
        self._refused = True
        self._disarm_header_deadline()
        if not self.transport.is_closing():
            self.transport.write(response)
            self.transport.close()

    def _progress(self) -> None:
        self._unparsed = 0

    # Connection events.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._unparsed += len(data)
        super().data_received(data)
        # No progress within this data and past the cap: something unfinished grows.
        if self._unparsed > self.header_max_bytes and not self._refused:
            self._refuse(_TOO_LARGE_RESPONSE)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing() or self._refused:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a pipelined request whose headers were complete now runs
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self) -> None:
        if self._refused:
            return  # refused at its headers: no upgrade
        super().handle_websocket_upgrade()

    # Parser callbacks.
    def on_message_begin(self) -> None:
        self._header_bytes = _REQUEST_LINE_OVERHEAD
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        if self._refused:
            return
        self._header_bytes += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._refused:
            return
        self._header_bytes += len(name) + len(value) + 4  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._progress()
        if self._header_bytes > self.header_max_bytes:
            self._refuse(_TOO_LARGE_RESPONSE)
            return
        self._disarm_header_deadline()  # headers complete: the request runs
        before = self.cycle
        super().on_headers_complete()
        if self.cycle is not None and self.cycle is not before:  # not an upgrade
            self.cycle.transport = HeadWithBody(self.transport, self.cycle, self.loop)

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        self._progress()
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._progress()
        super().on_message_complete()
