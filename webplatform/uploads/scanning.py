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

The client for clamd itself (the protocol, its deadlines) is ``webplatform.uploads.clamd``.
"""

from __future__ import annotations

import enum
import functools
import logging
import threading
import weakref

from django.conf import settings

from tenants.errors import ApplicationError
from webplatform.uploads.clamd import ClamdClient, ClamdError, PendingScan, clamd_address_parse
from webplatform.uploads.errors import UploadErrorCode, upload_error

logger = logging.getLogger(__name__)


class ScanVerdict(enum.StrEnum):
    CLEAN = "clean"  # clamd scanned the bytes and found nothing
    SKIPPED = "skipped"  # not scanned: scanning is off, or clamd failed and is not required
    # Sent to clamd, verdict not read yet: it is the request's to read before anything made
    # from the image reaches the client (``validation.image_validate_start``).
    PENDING = "pending"


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
