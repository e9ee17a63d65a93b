"""Virus scanning of uploaded bytes with ClamAV's daemon (clamd), over its INSTREAM protocol.

Policy (``settings.CLAMD_URL`` / ``settings.CLAMD_REQUIRED``):

- URL set, clamd answers: ``FOUND`` refuses the image (``malware_detected``, 400).
- URL set, clamd unreachable or answering an error: with ``CLAMD_REQUIRED`` the upload is
  refused with ``scanner_unavailable`` (503: our failure, fail closed); without it the image
  is accepted unscanned and a warning is logged every time.
- URL unset: with ``CLAMD_REQUIRED`` every upload is refused (503, misconfiguration); without
  it scanning is off, a warning is logged once per process and ``scanning_enabled()`` is
  False so the dashboard can say so.

``CLAMD_URL`` is ``tcp://host:port`` or ``unix:///path/to/clamd.ctl``. The scanner gets the
bytes exactly as the client sent them (after base64 decoding), never our re-encoded copy.

Why our own client: the INSTREAM protocol is four framing rules, and the maintained Python
client (clamav-client) is GPL-2.0 and has no overall deadline; python-clamd and pyClamd
have been unmaintained since 2014 and 2017; aioclamd is asyncio- and TCP-only.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from tenants.errors import ApplicationError
from webplatform.uploads.errors import UploadErrorCode, upload_error

logger = logging.getLogger(__name__)

DEFAULT_CLAMD_TIMEOUT_SECONDS = 15.0
_CHUNK_SIZE = 64 * 1024
_MAX_REPLY_BYTES = 4096


class ScanVerdict(enum.StrEnum):
    CLEAN = "clean"  # clamd scanned the bytes and found nothing
    SKIPPED = "skipped"  # not scanned: scanning is off, or clamd failed and is not required
    # Sent to clamd, verdict not read yet: it is the request's to read before anything made
    # from the image reaches the client (``validation.image_validate_start``).
    PENDING = "pending"


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


def scanning_enabled() -> bool:
    """Whether uploads are virus-scanned (a scanner is configured). For the dashboard."""
    return bool(settings.CLAMD_URL)


def scanning_required() -> bool:
    """Whether an upload is refused when the scanner cannot give a verdict."""
    return bool(settings.CLAMD_REQUIRED)


def scanner_ping() -> bool:
    """True when the configured clamd answers PING; False when off or unreachable."""
    if not settings.CLAMD_URL:
        return False
    try:
        return _client().ping()
    except ClamdError:
        return False


def image_scan(*, data: bytes, param: str | None = None) -> ScanVerdict:
    """Scan the client's original bytes; raise ``malware_detected`` or ``scanner_unavailable``.

    Returns ``CLEAN`` when scanned, ``SKIPPED`` when scanning is off or failed without being
    required (see the module docstring for the policy).
    """
    return image_scan_start(data=data, param=param).result()


class ImageScan:
    """One upload's scan, started by ``image_scan_start``: its bytes are with clamd, which
    scans them in its own process while the caller decodes. ``result`` waits for the
    verdict and applies the policy; call it exactly once (it closes the connection)."""

    def __init__(
        self,
        *,
        data_size: int,
        param: str | None,
        pending: PendingScan | None = None,
        failure: ClamdError | None = None,
    ) -> None:
        self._data_size = data_size
        self._param = param
        self._pending = pending
        # A failure to reach clamd is the scan's outcome: nothing of it is pending.
        self._failure = failure
        self._decided: ScanVerdict | ApplicationError | None = None

    def result(self) -> ScanVerdict:
        """``CLEAN`` or ``SKIPPED``; raises ``malware_detected`` or ``scanner_unavailable``."""
        if self._pending is None:
            return self._decided_result()
        try:
            signature = self._pending.verdict()
        except ClamdError as exc:
            return self._judged(failure=exc)
        return self._judged(signature=signature)

    async def result_async(self) -> ScanVerdict:
        """``result`` awaited on the running event loop: the verdict is read there, so a
        request waiting for it holds no thread. Cancelling it closes the connection."""
        if self._pending is None:
            return self._decided_result()
        try:
            signature = await self._pending.verdict_async()
        except ClamdError as exc:
            return self._judged(failure=exc)
        return self._judged(signature=signature)

    @property
    def decided(self) -> bool:
        """Whether ``result`` is known without clamd: no scanner configured, or clamd could
        not be reached when the bytes were sent."""
        return self._pending is None

    def close(self) -> None:
        """Give the verdict up, if not read yet (its request went away before)."""
        if self._pending is not None:
            self._pending.close()

    def _decided_result(self) -> ScanVerdict:
        """The outcome known without clamd, judged (and logged) once however often it is
        asked for."""
        if self._decided is None:
            try:
                self._decided = self._judged(failure=self._failure)
            except ApplicationError as refusal:
                self._decided = refusal
        if isinstance(self._decided, ApplicationError):
            raise self._decided
        return self._decided

    def _judged(
        self, *, signature: str | None = None, failure: ClamdError | None = None
    ) -> ScanVerdict:
        """The policy (module docstring) applied to what clamd said, or to its failure
        (``failure``), or to no scanner at all (neither, with no pending scan)."""
        if self._pending is None and failure is None:  # no scanner configured
            if scanning_required():
                logger.error("CLAMD_REQUIRED is set but CLAMD_URL is empty: refusing uploads")
                raise _scanner_unavailable(self._param)
            _warn_scanning_disabled()
            return ScanVerdict.SKIPPED
        if failure is not None:
            if scanning_required():
                logger.error("virus scan failed, upload refused: %s", failure)
                raise _scanner_unavailable(self._param) from failure
            logger.warning(
                "virus scan failed, image accepted unscanned (CLAMD_REQUIRED off): %s", failure
            )
            return ScanVerdict.SKIPPED
        if signature is not None:
            # The signature name stays in our logs: telling the client which rule matched
            # only helps someone tune a payload past it.
            logger.warning(
                "malware detected in upload: signature=%s bytes=%d param=%s",
                signature,
                self._data_size,
                self._param,
            )
            raise upload_error(
                UploadErrorCode.MALWARE_DETECTED,
                "The image was rejected by the malware scanner.",
                param=self._param,
            )
        return ScanVerdict.CLEAN


def image_scan_start(*, data: bytes, param: str | None = None) -> ImageScan:
    """Send the client's original bytes to clamd and return at once; ``ImageScan.result``
    gives the verdict. Nothing is raised here: a failure to reach clamd is the result's.

    Blocking: from async code call it in a thread, as ``image_validate`` is. A verdict may
    be read long after (``image_validate_start``), so a process has at most
    ``CLAMD_MAX_SCANS_IN_FLIGHT`` scans at clamd at once; one more waits here for a slot
    (at most ``CLAMD_TIMEOUT_SECONDS``, then it failed). clamd queues connections beyond
    its MaxThreads (default 10) up to its MaxQueue (default 100).
    """
    if not settings.CLAMD_URL:
        return ImageScan(data_size=len(data), param=param)
    client = _client()
    slots = _scan_slots(int(settings.CLAMD_MAX_SCANS_IN_FLIGHT))
    if not slots.acquire(timeout=client.timeout):
        failure = ClamdError(
            f"{settings.CLAMD_MAX_SCANS_IN_FLIGHT} scans of this process already wait for "
            f"clamd at {client.address} (CLAMD_MAX_SCANS_IN_FLIGHT)"
        )
        return ImageScan(data_size=len(data), param=param, failure=failure)
    try:
        pending = client.instream_start(data)
    except BaseException as exc:
        slots.release()
        if isinstance(exc, ClamdError):
            return ImageScan(data_size=len(data), param=param, failure=exc)
        raise
    release = _SlotRelease(slots)
    pending.when_closed(release)
    # A scan nobody closed (a bug, or a loop torn down) gives its slot back when collected.
    weakref.finalize(pending, release)
    return ImageScan(data_size=len(data), param=param, pending=pending)


class _SlotRelease:
    """Gives one scan's slot back, once, whoever calls first (its close, or its finalizer)."""

    def __init__(self, slots: threading.BoundedSemaphore) -> None:
        self._slots = slots
        self._lock = threading.Lock()
        self._released = False

    def __call__(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._slots.release()


@functools.cache
def _scan_slots(count: int) -> threading.BoundedSemaphore:
    """The scans one process may have at clamd at once (its verdict not read yet), per
    ``CLAMD_MAX_SCANS_IN_FLIGHT`` value. Validation no longer waits for the verdict, so
    without it a burst of requests would open as many clamd connections as it has
    requests, past clamd's ``MaxThreads`` + ``MaxQueue``; with it a scan beyond the count
    waits for a slot (at most ``CLAMD_TIMEOUT_SECONDS``, then the scan has failed)."""
    return threading.BoundedSemaphore(count)


def _client() -> ClamdClient:
    timeout = float(settings.CLAMD_TIMEOUT_SECONDS)
    return ClamdClient(clamd_address_parse(settings.CLAMD_URL), timeout=timeout)


def _scanner_unavailable(param: str | None) -> ApplicationError:
    return upload_error(
        UploadErrorCode.SCANNER_UNAVAILABLE,
        "The image could not be virus-scanned right now; please retry shortly.",
        param=param,
    )


@functools.cache
def _warn_scanning_disabled() -> None:
    # functools.cache makes this log once per process; tests call cache_clear().
    logger.warning("CLAMD_URL is not set: uploaded images are NOT virus-scanned")
