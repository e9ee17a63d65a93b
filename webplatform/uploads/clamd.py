"""A client for ClamAV's daemon (clamd): PING and INSTREAM, over TCP or a unix socket.

Blocking calls for threads (``ClamdClient.ping``, ``instream``), and a scan whose bytes are
sent at once and whose verdict is read later, from a thread or on the event loop
(``ClamdClient.instream_start``, ``PendingScan``). What a verdict means for an upload (the
policy) is ``webplatform.uploads.scanning``'s.

Why our own client: the INSTREAM protocol is four framing rules, and the maintained Python
client (clamav-client) is GPL-2.0 and has no overall deadline; python-clamd and pyClamd
have been unmaintained since 2014 and 2017; aioclamd is asyncio- and TCP-only.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured

DEFAULT_CLAMD_TIMEOUT_SECONDS = 15.0
_CHUNK_SIZE = 64 * 1024
_MAX_REPLY_BYTES = 4096


class ClamdError(Exception):
    """clamd could not be reached, timed out, or answered something other than a verdict."""


@dataclass(frozen=True, slots=True)
class ClamdAddress:
    """Where clamd listens: a TCP ``host``/``port`` or a unix socket ``path``."""

    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def is_unix(self) -> bool:
        return bool(self.path)

    def __str__(self) -> str:
        return f"unix://{self.path}" if self.is_unix else f"tcp://{self.host}:{self.port}"


def clamd_address_parse(url: str) -> ClamdAddress:
    """Parse ``tcp://host:port`` or ``unix:///path``; ``ImproperlyConfigured`` otherwise."""
    parts = urlsplit(url.strip())
    if parts.scheme == "unix" and parts.path and not parts.netloc:
        return ClamdAddress(path=parts.path)
    if parts.scheme == "tcp" and parts.hostname and not parts.path.strip("/"):
        try:
            port = parts.port
        except ValueError:
            port = None
        if port:
            return ClamdAddress(host=parts.hostname, port=port)
    raise ImproperlyConfigured(
        f"CLAMD_URL must be tcp://host:port or unix:///path/to/socket, not {url!r}"
    )


class ClamdClient:
    """A blocking clamd client for PING and INSTREAM, one connection per call.

    ``timeout`` bounds a whole call (connect, send, verdict), not each socket operation.
    Blocking: from async code call it in a thread (``sync_to_async(thread_sensitive=False)``).
    """

    def __init__(self, address: ClamdAddress, *, timeout: float = DEFAULT_CLAMD_TIMEOUT_SECONDS):
        self.address = address
        self.timeout = timeout

    def ping(self) -> bool:
        """True when clamd answers PONG; ``ClamdError`` when it cannot be reached."""
        deadline = time.monotonic() + self.timeout
        with self._connect(deadline) as sock:
            self._send(sock, b"zPING\0", deadline)
            return self._read_reply(sock, deadline) == "PONG"

    def instream(self, data: bytes) -> str | None:
        """Scan ``data``: the signature name when clamd finds something, None when clean."""
        return self.instream_start(data).verdict()

    def instream_start(self, data: bytes) -> PendingScan:
        """Connect and send ``data`` whole (one ``sendall`` of every INSTREAM frame); the
        verdict is read later (``PendingScan.verdict``), so clamd scans while the caller
        works. ``timeout`` bounds each half: the connect and send here, the wait for the
        verdict from when it is asked for (the caller's own work in between is not
        clamd's: a verdict already sent is never lost to a slow decode)."""
        deadline = time.monotonic() + self.timeout
        sock = self._connect(deadline)
        try:
            self._send(sock, _instream_frames(data), deadline)
        except ClamdError as exc:
            # clamd closes the stream early when it exceeds StreamMaxLength; its reply says
            # so and is more useful than "broken pipe".
            try:
                reply = self._read_reply(sock, deadline)
            except ClamdError:
                raise exc from None
            finally:
                sock.close()
            raise ClamdError(f"clamd at {self.address} refused the stream: {reply}") from exc
        except BaseException:
            sock.close()
            raise
        return PendingScan(self, sock)

    def _connect(self, deadline: float) -> socket.socket:
        try:
            if self.address.is_unix:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(_remaining(deadline))
                    sock.connect(self.address.path)
                except BaseException:
                    sock.close()
                    raise
                return sock
            return socket.create_connection(
                (self.address.host, self.address.port), timeout=_remaining(deadline)
            )
        except OSError as exc:
            raise ClamdError(f"cannot connect to clamd at {self.address}: {exc}") from exc

    def _send(self, sock: socket.socket, data: bytes | memoryview, deadline: float) -> None:
        try:
            sock.settimeout(_remaining(deadline))
            sock.sendall(data)
        except OSError as exc:  # socket.timeout is an OSError
            raise ClamdError(f"sending to clamd at {self.address} failed: {exc}") from exc

    def _read_reply(self, sock: socket.socket, deadline: float) -> str:
        reply = bytearray()
        try:
            while not reply.endswith(b"\0") and len(reply) <= _MAX_REPLY_BYTES:
                sock.settimeout(_remaining(deadline))
                chunk = sock.recv(1024)
                if not chunk:
                    break
                reply += chunk
        except OSError as exc:
            raise ClamdError(f"reading from clamd at {self.address} failed: {exc}") from exc
        return self._reply_text(reply)

    async def _read_reply_async(self, sock: socket.socket) -> str:
        """``_read_reply`` on the running event loop, within ``timeout`` from now."""
        loop = asyncio.get_running_loop()
        reply = bytearray()
        try:
            sock.setblocking(False)
            async with asyncio.timeout(self.timeout):
                while not reply.endswith(b"\0") and len(reply) <= _MAX_REPLY_BYTES:
                    chunk = await loop.sock_recv(sock, 1024)
                    if not chunk:
                        break
                    reply += chunk
        except TimeoutError as exc:
            raise ClamdError(f"no verdict from clamd at {self.address} in time") from exc
        except OSError as exc:
            raise ClamdError(f"reading from clamd at {self.address} failed: {exc}") from exc
        return self._reply_text(reply)

    def _reply_text(self, reply: bytearray) -> str:
        if not reply:
            raise ClamdError(f"clamd at {self.address} closed the connection without a reply")
        return reply.rstrip(b"\0").decode("utf-8", "replace").strip()


class PendingScan:
    """A stream sent to clamd (``ClamdClient.instream_start``) whose verdict is not read yet.
    Closing it (the verdict read, or given up) runs the ``when_closed`` callback once."""

    def __init__(self, client: ClamdClient, sock: socket.socket) -> None:
        self._client = client
        self._sock = sock
        self._on_close: Callable[[], None] | None = None

    def when_closed(self, callback: Callable[[], None]) -> None:
        self._on_close = callback

    def verdict(self) -> str | None:
        """Wait for clamd's verdict (the signature name, or None when clean), then close:
        at most the client's ``timeout`` from now."""
        deadline = time.monotonic() + self._client.timeout
        try:
            reply = self._client._read_reply(self._sock, deadline)
        finally:
            self.close()
        return _verdict_parse(reply, address=self._client.address)

    def close(self) -> None:
        """Give the verdict up (idempotent; a verdict read closed it already)."""
        self._sock.close()
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()

    async def verdict_async(self) -> str | None:
        """``verdict`` awaited on the running event loop (no thread waits for clamd)."""
        try:
            reply = await self._client._read_reply_async(self._sock)
        finally:
            self.close()
        return _verdict_parse(reply, address=self._client.address)


def _instream_frames(data: bytes) -> bytes:
    """The INSTREAM command and ``data`` in length-prefixed chunks, ended by a zero length:
    one buffer, so the sending thread gives up the GIL once, not twice a chunk."""
    view = memoryview(data)
    frames: list[bytes | memoryview] = [b"zINSTREAM\0"]
    for start in range(0, len(view), _CHUNK_SIZE):
        chunk = view[start : start + _CHUNK_SIZE]
        frames += (struct.pack("!I", len(chunk)), chunk)
    frames.append(struct.pack("!I", 0))
    return b"".join(frames)


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("clamd call timed out")
    return remaining


def _verdict_parse(reply: str, *, address: ClamdAddress) -> str | None:
    # Replies: "stream: OK", "stream: <signature> FOUND", "<reason> ERROR".
    if reply.endswith(" FOUND"):
        _, _, found = reply.partition(": ")
        return found[: -len(" FOUND")].strip() or "unknown"
    if reply.endswith(": OK"):
        return None
    raise ClamdError(f"clamd at {address} answered {reply!r}")
