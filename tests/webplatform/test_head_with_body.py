"""``webplatform.server.HeadWithBody``: uvicorn's own request cycle, driven by the
project's protocol over a transport that records each write, writes a response's head with
its body in one write when the head announces a body, and as before otherwise."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from webplatform.server import HeaderLimitsHttpToolsProtocol

Send = Any


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.events: list[str] = []  # "write" and "close", in order
        self.closed = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))
        self.events.append("write")

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True
        self.events.append("close")

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _connected(app: Any) -> tuple[HeaderLimitsHttpToolsProtocol, RecordingTransport]:
    """The project's protocol serving ``app``, connected to a recording transport."""
    config = uvicorn.Config(app, http=HeaderLimitsHttpToolsProtocol, lifespan="off")
    config.load()
    protocol = HeaderLimitsHttpToolsProtocol(
        config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop()
    )
    transport = RecordingTransport()
    protocol.connection_made(transport)
    return protocol, transport


async def _serve(app: Any, request: bytes, *, settle_turns: int = 20) -> RecordingTransport:
    """``request`` through the protocol and ``app``; the transport once the app is done."""
    protocol, transport = _connected(app)
    protocol.data_received(request)
    for task in list(protocol.tasks):
        await task
    for _ in range(settle_turns):  # anything the loop was asked to do next
        await asyncio.sleep(0)
    protocol.connection_lost(None)
    return transport


GET = b"GET /x HTTP/1.1\r\nHost: test\r\n\r\n"


def _answer(headers: list[tuple[bytes, bytes]], *bodies: bytes, between: Any = None) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if between is not None:
            await between()
        for index, body in enumerate(bodies):
            more = index < len(bodies) - 1
            await send({"type": "http.response.body", "body": body, "more_body": more})

    return app


async def test_a_head_with_a_content_length_goes_out_with_the_body_in_one_write() -> None:
    app = _answer([(b"content-length", b"5")], b"hello")
    transport = await _serve(app, GET)
    assert len(transport.writes) == 1
    head, body = transport.writes[0].split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK") and b"content-length: 5" in head
    assert body == b"hello"


async def test_a_body_sent_in_parts_still_goes_out_part_by_part_after_the_first() -> None:
    app = _answer([(b"content-length", b"10")], b"hello", b"world")
    transport = await _serve(app, GET)
    assert len(transport.writes) == 2
    assert transport.writes[0].endswith(b"\r\n\r\nhello")
    assert transport.writes[1] == b"world"


async def test_a_streamed_response_is_written_as_it_comes() -> None:
    # No Content-Length: chunked; an SSE stream's head must not wait for its first event.
    app = _answer([(b"content-type", b"text/event-stream")], b"data: 1\n\n", b"")
    transport = await _serve(app, GET)
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK")
    assert transport.writes[0].endswith(b"transfer-encoding: chunked\r\n\r\n")
    assert transport.writes[1] == b"9\r\ndata: 1\n\n\r\n"
    assert b"".join(transport.writes).endswith(b"0\r\n\r\n")


async def test_an_empty_response_is_not_held() -> None:
    app = _answer([(b"content-length", b"0")], b"")
    transport = await _serve(app, GET)
    assert transport.writes[0].endswith(b"content-length: 0\r\n\r\n")  # the head, at once
    assert not any(transport.writes[1:])  # uvicorn's write of the empty body


async def test_a_held_head_goes_out_at_the_loops_next_turn_when_the_body_is_late() -> None:
    body_may_come = asyncio.Event()
    app = _answer([(b"content-length", b"2")], b"ok", between=body_may_come.wait)
    protocol, transport = _connected(app)
    protocol.data_received(GET)
    for _ in range(10):
        await asyncio.sleep(0)
    assert len(transport.writes) == 1  # the head alone: it did not wait for the body
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK")
    assert transport.writes[0].endswith(b"\r\n\r\n")
    body_may_come.set()
    for task in list(protocol.tasks):
        await task
    assert transport.writes[1:] == [b"ok"]
    protocol.connection_lost(None)


async def test_a_hundred_continue_is_written_at_once_and_is_not_taken_for_the_head() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Send) -> None:
        message = await receive()  # asks uvicorn for the body: it sends 100 Continue
        body = message.get("body", b"")
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    request = b"POST /x HTTP/1.1\r\nHost: test\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
    protocol, transport = _connected(app)
    protocol.data_received(request)
    for _ in range(10):
        await asyncio.sleep(0)
    assert transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    protocol.data_received(b"abc")
    for task in list(protocol.tasks):
        await task
    assert len(transport.writes) == 2
    assert transport.writes[1].startswith(b"HTTP/1.1 200 OK")
    assert transport.writes[1].endswith(b"\r\n\r\nabc")
    protocol.connection_lost(None)


async def test_a_connection_closed_after_the_response_closes_after_writing_it() -> None:
    app = _answer([(b"content-length", b"3")], b"bye")
    protocol, transport = _connected(app)
    protocol.data_received(b"GET /x HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
    for task in list(protocol.tasks):
        await task
    assert transport.events == ["write", "close"]  # the cycle closed it, after the response
    assert transport.writes[0].endswith(b"\r\n\r\nbye")
    protocol.connection_lost(None)


async def test_a_head_requests_head_is_written_at_once() -> None:
    # Django gives a HEAD response the Content-Length of its GET; uvicorn sends no body.
    at_send: list[int] = []
    transports: list[RecordingTransport] = []

    async def note() -> None:  # right after the head's send, in the same turn of the loop
        at_send.append(len(transports[0].writes))

    app = _answer([(b"content-length", b"5")], b"", between=note)
    protocol, transport = _connected(app)
    transports.append(transport)
    protocol.data_received(b"HEAD /x HTTP/1.1\r\nHost: test\r\n\r\n")
    for task in list(protocol.tasks):
        await task
    assert at_send == [1]
    assert transport.writes[0].endswith(b"content-length: 5\r\n\r\n")
    assert not any(transport.writes[1:])
    protocol.connection_lost(None)


async def test_pipelined_responses_keep_their_order() -> None:
    app = _answer([(b"content-length", b"2")], b"ok")
    transport = await _serve(app, GET + b"GET /y HTTP/1.1\r\nHost: test\r\n\r\n" + GET)
    whole = b"".join(transport.writes)
    assert whole.count(b"HTTP/1.1 200 OK") == 3
    assert [part.endswith(b"\r\n\r\nok") for part in whole.split(b"HTTP/1.1 200 OK")[1:]] == [
        True
    ] * 3
    assert len(transport.writes) == 3  # each head with its body


@pytest.mark.parametrize("status", [204, 304])
async def test_bodiless_statuses_are_not_held(status: int) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    transport = await _serve(app, GET)
    assert transport.writes[0].startswith(f"HTTP/1.1 {status}".encode())  # the head, at once
    assert transport.writes[0].endswith(b"\r\n\r\n")
    assert not any(transport.writes[1:])
