"""Fixtures for the upload tests: scanning off by default, the real clamd, a fake clamd.

The real clamd is the one ``scripts/clamd-test.sh`` starts with the project's EICAR
signature; ``make test`` exports its ``CLAMD_URL``. Tests that need it fail (never skip)
when ``CLAMD_URL`` is unset, so a CI run without a scanner cannot pass green.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from webplatform.uploads import scanning
from webplatform.uploads.clamd import ClamdClient, ClamdError, clamd_address_parse


@pytest.fixture(autouse=True)
def _uploads_settings(settings):
    """Each test starts with scanning off and no remote hosts; tests opt in to the rest."""
    settings.CLAMD_URL = ""
    settings.CLAMD_REQUIRED = False
    settings.CLAMD_TIMEOUT_SECONDS = 5.0
    settings.REMOTE_IMAGE_HOST_ALLOWLIST = []
    settings.IMAGE_MAX_PIXELS = 40_000_000
    settings.IMAGE_MAX_PER_REQUEST = 4
    scanning._warn_scanning_disabled.cache_clear()
    yield
    scanning._warn_scanning_disabled.cache_clear()


@pytest.fixture
def real_clamd(settings) -> str:
    """The real clamd from ``CLAMD_URL``, scanning required. Fails when it is missing."""
    url = os.environ.get("CLAMD_URL", "")
    if not url:
        pytest.fail(
            "These tests need the real clamd: export CLAMD_URL=$(bash scripts/clamd-test.sh)"
        )
    try:
        answered = ClamdClient(clamd_address_parse(url), timeout=5).ping()
    except ClamdError as exc:
        pytest.fail(f"CLAMD_URL={url} does not answer: {exc}")
    assert answered, f"clamd at {url} did not answer PONG"
    settings.CLAMD_URL = url
    settings.CLAMD_REQUIRED = True
    return url


@dataclass
class FakeClamd:
    """A clamd stand-in in a thread: records every INSTREAM payload and answers ``reply``.

    ``reply=None`` never answers (to exercise the client's deadline); ``delay_s`` waits that
    long after a stream before answering (``replied_at``: just before each verdict was
    sent, ``time.monotonic``).
    """

    url: str
    reply: str | None = "stream: OK"
    delay_s: float = 0.0
    replied_at: list[float] = field(default_factory=list)
    streams: list[bytes] = field(default_factory=list)
    chunk_sizes: list[int] = field(default_factory=list)
    commands: list[bytes] = field(default_factory=list)


def _serve(listener: socket.socket, fake: FakeClamd, stop: threading.Event) -> None:
    listener.settimeout(0.1)
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            try:
                _handle(conn, fake, stop)
            except OSError:
                pass


def _read_exact(conn: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("client closed")
        data += chunk
    return bytes(data)


def _handle(conn: socket.socket, fake: FakeClamd, stop: threading.Event) -> None:
    command = bytearray()
    while not command.endswith((b"\0", b"\n")):
        command += _read_exact(conn, 1)
    fake.commands.append(bytes(command))
    if command[1:-1] == b"PING":
        conn.sendall(b"PONG\0")
        return
    stream = bytearray()
    while True:
        (size,) = struct.unpack("!I", _read_exact(conn, 4))
        if size == 0:
            break
        fake.chunk_sizes.append(size)
        stream += _read_exact(conn, size)
    fake.streams.append(bytes(stream))
    if fake.reply is None:
        stop.wait(10)
        return
    if fake.delay_s:
        stop.wait(fake.delay_s)
    fake.replied_at.append(time.monotonic())  # before: nobody can have read it earlier
    conn.sendall(fake.reply.encode() + b"\0")


@pytest.fixture(params=["tcp", "unix"])
def fake_clamd(request, settings) -> Iterator[FakeClamd]:
    """A fake clamd on TCP and on a unix socket, configured as required."""
    socket_dir = None
    if request.param == "tcp":
        listener = socket.create_server(("127.0.0.1", 0))
        url = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    else:
        # A short directory: unix socket paths are limited to ~107 bytes.
        socket_dir = tempfile.mkdtemp(prefix="clamd", dir="/tmp")
        path = os.path.join(socket_dir, "clamd.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen()
        url = f"unix://{path}"
    fake = FakeClamd(url=url)
    stop = threading.Event()
    thread = threading.Thread(target=_serve, args=(listener, fake, stop), daemon=True)
    thread.start()
    settings.CLAMD_URL = url
    settings.CLAMD_REQUIRED = True
    try:
        yield fake
    finally:
        stop.set()
        thread.join(5)
        listener.close()
        if socket_dir:
            shutil.rmtree(socket_dir, ignore_errors=True)


@pytest.fixture
def closed_port_url() -> str:
    """A TCP URL on which nothing listens."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"
