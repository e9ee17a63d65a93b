"""``webplatform.server.HeaderLimitsHttpToolsProtocol`` on a real uvicorn (uvloop, httptools)
in a thread, serving a minimal ASGI application, over raw sockets: the header cap and the
header deadline hold for pipelined requests and chunked trailers too."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from tests.webplatform.raw_http import read_until_closed
from webplatform.server import HeaderLimitsHttpToolsProtocol

DEADLINE_S = 1.0


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/slow":
        await asyncio.sleep(DEADLINE_S * 1.6)
    answer = f"{scope['path']} {len(body)}".encode()
    headers = []
    if scope["path"].startswith("/sized"):  # as Django answers: Content-Length, HEAD too
        headers.append((b"content-length", str(len(answer)).encode()))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


class Limits(HeaderLimitsHttpToolsProtocol):
    header_timeout_s = DEADLINE_S
    header_max_bytes = 16384


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = int(probe.getsockname()[1])
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=free,
        loop="uvloop",
        http=Limits,
        log_level="warning",
        lifespan="off",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield free
    server.should_exit = True
    thread.join(10)


def _grow(sock: socket.socket, piece: bytes, total: int) -> int:
    sent = 0
    try:
        while sent < total:
            sock.sendall(piece)
            sent += len(piece)
            time.sleep(0.001)
    except OSError:
        pass
    return sent


def test_a_pipelined_requests_endless_header_is_cut_while_another_runs(port: int) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\nX-Big: ")
    sent = _grow(sock, b"a" * 4096, 4_000_000)
    data, _ = read_until_closed(sock, limit_s=5)
    assert b"431 Request Header Fields Too Large" in data, data[:300]
    assert sent < 4_000_000  # closed long before the client sent it all


def test_a_chunked_bodys_endless_trailer_is_cut(port: int) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-Trailer: "
    )
    sent = _grow(sock, b"t" * 4096, 4_000_000)
    data, elapsed = read_until_closed(sock, limit_s=5)
    assert b"431 Request Header Fields Too Large" in data, data[:300]
    assert sent < 4_000_000 and elapsed < 3


def test_a_long_pipelined_request_is_not_cut_by_the_header_deadline(port: int) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    # /slow runs longer than the header deadline, after /fast: its headers were complete.
    sock.sendall(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\nGET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.settimeout(DEADLINE_S * 4)
    data = b""
    # Both responses whole (chunked: each ends with its last chunk) before anything else.
    while data.count(b"\r\n0\r\n\r\n") < 2:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    assert data.count(b"HTTP/1.1 200") == 2 and b"/slow 0" in data
    assert b"408" not in data
    sock.close()


def test_a_refused_pipelined_request_runs_nothing_after_it(port: int) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    big = b"X-Big: " + b"b" * 20_000 + b"\r\n"
    sock.sendall(
        b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /refused HTTP/1.1\r\nHost: x\r\n" + big + b"Content-Length: 7\r\n\r\nsmuggle"
        b"POST /after HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
    )
    data, _ = read_until_closed(sock, limit_s=5)
    assert b"431 Request Header Fields Too Large" in data
    assert b"/after" not in data and b"/refused" not in data
    assert b"/first 7" not in data  # the refused request's body went to nobody


def test_sized_responses_pipelined_with_a_head_request_arrive_whole_and_in_order(
    port: int,
) -> None:
    # webplatform.server.HeadWithBody holds each sized head for its body; a HEAD
    # request's head has no body to wait for.
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"GET /sized-1 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"HEAD /sized-2 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /sized-3 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
    )
    data, _ = read_until_closed(sock, limit_s=5)
    first, second, third = data.split(b"HTTP/1.1 200 OK\r\n")[1:]
    assert b"content-length: 10\r\n" in first and first.endswith(b"\r\n\r\n/sized-1 0")
    assert b"content-length: 10\r\n" in second and second.endswith(b"\r\n\r\n")  # no body
    assert b"content-length: 10\r\n" in third and third.endswith(b"\r\n\r\n/sized-3 2")


def test_the_header_deadline_still_cuts_a_silent_connection(port: int) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    data, elapsed = read_until_closed(sock, limit_s=DEADLINE_S + 3)
    assert data.startswith(b"HTTP/1.1 408")
    assert elapsed < DEADLINE_S + 2


def test_a_websocket_upgrade_past_the_cap_is_refused_not_upgraded(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"X-Big: " + b"w" * 20_000 + b"\r\n\r\n"
    )
    data, _ = read_until_closed(sock, limit_s=5)
    assert data.startswith(b"HTTP/1.1 431"), data[:200]
    assert "Traceback" not in caplog.text and "KeyError" not in caplog.text
