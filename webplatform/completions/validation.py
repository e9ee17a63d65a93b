"""Step 2, validate: every image of the request, through ``webplatform.uploads``.

Size cap, magic bytes, pixel cap, ClamAV on the original bytes, then the image scaled down
to its pixel budget (the model's, for the image's OpenAI ``detail``: ``uploads.budget``)
and handed on as raw pixels, the images of a request at once; the first refusal in the
client's order is the request's error (an ``ApplicationError`` naming the image's field in
``param``).

The virus scan's verdicts gate the answer, not the enqueue (``ScanVerdicts``): clamd scans
the client's bytes in its own process, and a scan of new bytes takes longer than the decode
(on the benchmark's machine ~9 ms against ~3.5 for a 141 KB JPEG, ~275 ms against ~95 for a
12 MP phone photo: ``benchmarks/clamd_scan.py``), so the request goes on to the worker with the pixels
while clamd works, and ``CompletionRun.events`` reads every verdict before the client sees
anything: a refusal then cancels the request in the worker and is the request's error, as
if it had come here. What reaches the worker before the verdict is only ever our own
pixels (decoded here, metadata-free), never the client's bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence

from asgiref.sync import sync_to_async

from tenants.errors import ApplicationError
from webplatform.completions.request import ChatCompletionInput, ImageSource
from webplatform.metrics import upload_refused
from webplatform.uploads.budget import image_pixel_budget
from webplatform.uploads.services import (
    ImageScan,
    UploadLimits,
    ValidatedImage,
    upload_validate_image_start,
)

logger = logging.getLogger(__name__)


class ScanVerdicts:
    """The scan verdicts of a request's images, read on the event loop from the moment
    validation hands them on, each bounded by ``CLAMD_TIMEOUT_SECONDS``. ``passed()`` waits
    for all and raises the refusal of the first refused image in the client's order. The
    read runs to its end also when nobody waits any more (a client gone): every refusal is
    logged, the request's counted (``upload_refused``), every connection closed. ``when_refused`` runs a callback (the
    run's cancel in the worker) as soon as a refusal is read."""

    def __init__(self, scans: Sequence[ImageScan], *, counted: bool = True) -> None:
        self._when_refused: Callable[[], Awaitable[None]] | None = None
        self._counted = counted  # a refusal counted (upload_refused) for its request
        self._task: asyncio.Task[None] | None = None
        if scans:
            self._task = asyncio.ensure_future(self._read(scans))
            # Held until done (the loop keeps only weak references to tasks), its outcome
            # retrieved even when nobody awaits it, and every connection closed, also those
            # of a read that never started (a loop shutting down).
            _reading.add(self._task)
            self._task.add_done_callback(functools.partial(_finished, scans))

    def done(self) -> bool:
        """Whether every verdict is in (``passed()`` then answers at once)."""
        return self._task is None or self._task.done()

    def when_refused(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Await ``callback`` when a refusal is read (not when it was read already: check
        ``done()`` first)."""
        self._when_refused = callback

    async def passed(self) -> None:
        """Return when every image was found clean (or scanning is off and not required);
        raise the first refusal (``malware_detected``, ``scanner_unavailable``). Cancelling
        the caller does not stop the read."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def _read(self, scans: Sequence[ImageScan]) -> None:
        outcomes = await asyncio.gather(
            *(scan.result_async() for scan in scans), return_exceptions=True
        )
        refusal = next((o for o in outcomes if isinstance(o, BaseException)), None)
        if refusal is None:
            return
        if self._counted and isinstance(refusal, ApplicationError):
            upload_refused(code=refusal.code)
        if self._when_refused is not None:
            try:
                await self._when_refused()
            except Exception:  # the refusal stands: the request ends on it anyway
                logger.warning("could not stop a request whose image was refused", exc_info=True)
        raise refusal


_reading: set[asyncio.Task[None]] = set()


def _finished(scans: Sequence[ImageScan], task: asyncio.Task[None]) -> None:
    _reading.discard(task)
    for scan in scans:
        scan.close()
    if not task.cancelled():
        task.exception()


async def images_validate(
    *, inp: ChatCompletionInput, limits: UploadLimits
) -> tuple[dict[ImageSource, ValidatedImage], ScanVerdicts]:
    """The request's new images, validated and re-encoded (images stored by an earlier turn
    of a conversation were validated then), and their scans' verdicts still to come.

    The images are validated at once, each in a thread (decoding and scanning are CPU and IO
    bound: off the event loop; Pillow and the clamd socket release the GIL); the refusal of
    the first refused image in the client's order is the request's error. A refusal known
    here (the image's own, or a scan already decided: no scanner, or clamd unreachable) is
    raised here, before anything is enqueued, once every earlier image's verdict is read,
    so a scan refusal of an earlier image still wins.
    """
    sources = [source for turn in inp.turns for source in turn.images]
    outcomes = await asyncio.gather(
        *(_image_validate(source=source, limits=limits, model=inp.model) for source in sources),
        return_exceptions=True,
    )
    for index, outcome in enumerate(outcomes):
        refusal = outcome if isinstance(outcome, BaseException) else _decided_refusal(outcome[1])
        if refusal is None:
            continue
        before = [o[1] for o in outcomes[:index] if not isinstance(o, BaseException)]
        after = [o[1] for o in outcomes[index + 1 :] if not isinstance(o, BaseException)]
        ScanVerdicts(after, counted=False)  # read to their end (logged), then closed
        await ScanVerdicts(before).passed()
        if isinstance(refusal, ApplicationError):  # an UploadErrorCode: a fixed vocabulary
            upload_refused(code=refusal.code)
        raise refusal
    images: dict[ImageSource, ValidatedImage] = {}
    scans: list[ImageScan] = []
    for source, outcome in zip(sources, outcomes, strict=True):
        assert not isinstance(outcome, BaseException)
        image, scan = outcome
        images[source] = image
        scans.append(scan)
    return images, ScanVerdicts(scans)


def _decided_refusal(scan: ImageScan) -> ApplicationError | None:
    """The refusal of a scan whose outcome needs no clamd, if it is one."""
    if not scan.decided:
        return None
    try:
        scan.result()
    except ApplicationError as refusal:
        return refusal
    return None


async def _image_validate(
    *, source: ImageSource, limits: UploadLimits, model: str
) -> tuple[ValidatedImage, ImageScan]:
    budget = image_pixel_budget(model=model, detail=source.detail or "auto")
    image_limits = dataclasses.replace(limits, pixel_budget=budget)
    validating = asyncio.ensure_future(
        sync_to_async(upload_validate_image_start, thread_sensitive=False)(
            source=source.url, limits=image_limits, param=source.param
        )
    )
    try:
        # Shielded: the thread runs on when the request is cancelled meanwhile, and what it
        # hands back must still have its scan closed.
        return await asyncio.shield(validating)
    except asyncio.CancelledError:
        validating.add_done_callback(_close_unclaimed_scan)
        raise


def _close_unclaimed_scan(validating: asyncio.Future[tuple[ValidatedImage, ImageScan]]) -> None:
    if not validating.cancelled() and validating.exception() is None:
        _image, scan = validating.result()
        scan.close()
