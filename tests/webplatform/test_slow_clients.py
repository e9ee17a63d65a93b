"""Slow and oversized clients are cut off by the server as documented (docs/reliability.md,
"Hostile input"): a real uvicorn subprocess started the way the Makefile starts it (the
flags of ``UVICORN_LIMITS``, the application's body limits), talked to over raw sockets.

No view runs for any of these requests, so the server needs no database or worker.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.webplatform.raw_http import read_until_closed

ROOT = Path(__file__).resolve().parents[2]
HEADER_TIMEOUT_S = 1.0
BODY_IDLE_S = 1.0
BODY_TOTAL_S = 3.0
MAX_BYTES = 64 * 1024


def _makefile_uvicorn_limits() -> list[str]:
    """The flags ``make run`` gives uvicorn for slow clients (``UVICORN_LIMITS``)."""
    for line in (ROOT / "Makefile").read_text().splitlines():
        if line.startswith("UVICORN_LIMITS ="):
            return line.split("=", 1)[1].split()
    raise AssertionError("the Makefile defines no UVICORN_LIMITS")


def test_every_documented_server_command_sets_the_slow_client_limits() -> None:
    flags = _makefile_uvicorn_limits()
    assert "webplatform.server:HeaderLimitsHttpToolsProtocol" in flags
    assert flags[flags.index("--loop") + 1] == "uvloop"
    assert "$(UVICORN_LIMITS)" in (ROOT / "Makefile").read_text()
    for path in ("docker/Dockerfile", "docker/k8s/web.yaml"):
        text = (ROOT / path).read_text()
        for flag in flags:
            assert f'"{flag}"' in text, (path, flag)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    port = _free_port()
    env = {
        **os.environ,
        "PLATFORM_VAR_DIR": str(tmp_path_factory.mktemp("var")),
        "HTTP_HEADER_TIMEOUT_SECONDS": str(HEADER_TIMEOUT_S),
        "REQUEST_BODY_IDLE_SECONDS": str(BODY_IDLE_S),
        "REQUEST_BODY_TIMEOUT_SECONDS": str(BODY_TOTAL_S),
        "REQUEST_BODY_MAX_BYTES": str(MAX_BYTES),
        "INFERENCE_PRELOAD": "0",
    }
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "webplatform.asgi:application",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *_makefile_uvicorn_limits(),
        "--log-level",
        "warning",
    ]
    process = subprocess.Popen(command, cwd=ROOT, env=env)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("uvicorn did not start") from None
            time.sleep(0.2)
    try:
        yield port
    finally:
        process.terminate()
        process.wait(15)


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def test_headers_trickled_slowly_are_cut_at_the_header_deadline(server: int) -> None:
    sock = _connect(server)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    start = time.monotonic()
    closed = False
    # One header line every 0.4 s: each arrives well within any idle limit; only a
    # deadline on the whole header block stops it.
    for i in range(20):
        time.sleep(0.4)
        try:
            sock.sendall(f"X-Slow-{i}: y\r\n".encode())
        except OSError:
            closed = True
            break
    data, _ = read_until_closed(sock, limit_s=5)
    elapsed = time.monotonic() - start
    assert data.startswith(b"HTTP/1.1 408"), data
    assert closed or elapsed < 8.5
    assert elapsed < HEADER_TIMEOUT_S + 2.5


def test_a_connection_that_sends_nothing_is_closed(server: int) -> None:
    sock = _connect(server)
    data, elapsed = read_until_closed(sock, limit_s=HEADER_TIMEOUT_S + 3)
    assert data.startswith(b"HTTP/1.1 408")
    assert elapsed < HEADER_TIMEOUT_S + 2


def test_a_stalled_upload_is_cut_at_the_idle_deadline(server: int) -> None:
    sock = _connect(server)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        b'{"messages": ['
    )
    data, elapsed = read_until_closed(sock, limit_s=BODY_IDLE_S + 4)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), data
    assert b"connection: close" in head.lower()
    assert b'"code":"request_timeout"' in body.replace(b" ", b"")
    assert elapsed < BODY_IDLE_S + 2


def test_a_body_trickled_in_small_chunks_is_cut_at_the_total_deadline(server: int) -> None:
    sock = _connect(server)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    start = time.monotonic()
    for _ in range(int(BODY_TOTAL_S / 0.5) + 6):  # never idle for BODY_IDLE_S
        try:
            sock.sendall(b"1\r\n \r\n")
        except OSError:
            break
        time.sleep(0.5)
        sock.settimeout(0.01)
        try:
            if sock.recv(1, socket.MSG_PEEK):
                break
        except (TimeoutError, BlockingIOError):
            pass
    data, _ = read_until_closed(sock, limit_s=5)
    assert data.startswith(b"HTTP/1.1 408"), data
    assert time.monotonic() - start < BODY_TOTAL_S + 2


def test_a_declared_length_beyond_the_cap_is_refused_before_reading(server: int) -> None:
    sock = _connect(server)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: "
        + str(10 * MAX_BYTES).encode()
        + b"\r\n\r\n"
    )
    data, elapsed = read_until_closed(sock, limit_s=5)
    assert data.startswith(b"HTTP/1.1 413"), data
    assert b'"code":"request_too_large"' in data.replace(b" ", b"")
    assert elapsed < 2


def test_a_chunked_body_growing_past_the_cap_is_cut_there(server: int) -> None:
    sock = _connect(server)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"x" * 16384
    # Just past the cap, then nothing more: the server reads it all, so its answer is not
    # lost to a reset over unread bytes.
    for _ in range(MAX_BYTES // len(chunk) + 1):
        sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
    data, elapsed = read_until_closed(sock, limit_s=5)
    assert data.startswith(b"HTTP/1.1 413"), data
    assert elapsed < 2  # not the idle deadline: cut as soon as the cap was passed


def test_headers_past_the_cap_in_one_send_are_refused_with_431(server: int) -> None:
    sock = _connect(server)
    # One write holding the whole request, body included: the parsed header size decides.
    big = b"X-Big: " + b"y" * 20_000 + b"\r\n"
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + big
        + b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    )
    data, elapsed = read_until_closed(sock, limit_s=5)
    assert data.startswith(b"HTTP/1.1 431"), data
    assert elapsed < 2


def test_headers_growing_past_the_cap_without_end_are_cut_there(server: int) -> None:
    sock = _connect(server)
    sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Endless: ")
    sent = 0
    try:
        while sent < 1_000_000:  # far past the cap; the server closes long before
            sock.sendall(b"z" * 4096)
            sent += 4096
            time.sleep(0.001)
    except OSError:
        pass
    data, elapsed = read_until_closed(sock, limit_s=5)
    assert data.startswith(b"HTTP/1.1 431"), data
    assert sent < 1_000_000 or elapsed < 2


def test_headers_within_the_cap_are_served_on_a_kept_alive_connection(server: int) -> None:
    sock = _connect(server)
    request = (
        b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"p" * 12_000 + b"\r\n\r\n"
    )
    for _ in range(2):  # the second request's headers are counted afresh
        sock.sendall(request)
        assert _read_response(sock).startswith(b"HTTP/1.1 200")
    sock.close()


def test_pipelined_requests_each_get_the_header_cap(server: int) -> None:
    sock = _connect(server)
    request = (
        b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"p" * 10_000 + b"\r\n\r\n"
    )
    sock.sendall(request * 3)  # 30 KB of headers in one write, 10 KB per request
    for _ in range(3):
        assert _read_response(sock).startswith(b"HTTP/1.1 200")
    sock.close()


def _read_response(sock: socket.socket) -> bytes:
    """One whole response with a ``Content-Length`` body, the connection left open."""
    sock.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return data
