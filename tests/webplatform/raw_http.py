"""Raw-socket helpers for the tests that talk HTTP to a live server byte by byte."""

from __future__ import annotations

import socket
import time


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes (or resets) the connection, and how long
    that took; an AssertionError if it is still open after ``limit_s``."""
    start = time.monotonic()
    data = b""
    sock.settimeout(limit_s)
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"still open after {limit_s}s; got {data[:300]!r}") from None
        except ConnectionResetError:
            return data, time.monotonic() - start
        if not chunk:
            return data, time.monotonic() - start
        data += chunk
