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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from asgiref.sync import sync_to_async

from tenants.errors import ApplicationError
from webplatform.completions.background import background
from webplatform.completions.request import ChatCompletionInput, ImageSource
from webplatform.metrics import upload_refused
from webplatform.uploads.budget import image_pixel_budget
from webplatform.uploads.services import (
    ImageScan,
    ScanVerdict,
    UploadLimits,
    ValidatedImage,
    upload_validate_image_start,
)


class ScanVerdicts:
    """The scan verdicts of a request's images. Each image's verdict is read on the event
    loop from the moment its validation returns (``_verdict_read``: a task of its own, held
    until done, bounded by ``CLAMD_TIMEOUT_SECONDS``), so its clamd connection and slot last
    as long as clamd takes, whatever becomes of the request: every refusal is logged and
    every connection closed also when the client left. ``passed()`` waits for all and
    raises the refusal of the first refused image in the client's order (counted once for
    the request, ``upload_refused``); ``when_refused`` runs a callback as soon as one is
    read."""

    def __init__(self, reads: Sequence[asyncio.Task[ScanVerdict]]) -> None:
        self._when_refused: Callable[[], None] | None = None
        self._task: asyncio.Task[None] | None = None
        if reads:
            self._task = background(self._judge(reads))

    def done(self) -> bool:
        """Whether every verdict is in (``passed()`` then answers at once)."""
        return self._task is None or self._task.done()

    def when_refused(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when a refusal is read (not when it was read already: check
        ``done()`` first, in the same step of the event loop)."""
        self._when_refused = callback

    async def passed(self) -> None:
        """Return when every image was found clean (or scanning is off and not required);
        raise the first refusal (``malware_detected``, ``scanner_unavailable``). Cancelling
        the caller does not stop the reads."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def refusal(self) -> ApplicationError | None:
        """``passed()``'s refusal as a value: None when every image was found clean."""
        try:
            await self.passed()
        except ApplicationError as refusal:
            return refusal
        return None

    async def _judge(self, reads: Sequence[asyncio.Task[ScanVerdict]]) -> None:
        # Not shielded: this task is only ever cancelled with its loop (``passed`` shields it).
        outcomes = await asyncio.gather(*reads, return_exceptions=True)
        refusal = next((o for o in outcomes if isinstance(o, BaseException)), None)
        if refusal is None:
            return
        if isinstance(refusal, ApplicationError):
            upload_refused(code=refusal.code)
        if self._when_refused is not None:
            self._when_refused()
        raise refusal


def _verdict_read(scan: ImageScan) -> asyncio.Task[ScanVerdict]:
    """Read ``scan``'s verdict now, whoever waits for it; its connection is closed when done
    (also when the read never started: a loop torn down)."""
    read = background(scan.result_async())
    read.add_done_callback(lambda _read: scan.close())
    return read


@dataclass(frozen=True)
class _Validated:
    image: ValidatedImage
    scan: ImageScan
    read: asyncio.Task[ScanVerdict]


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
        refusal = outcome if isinstance(outcome, BaseException) else _decided_refusal(outcome.scan)
        if refusal is None:
            continue
        # The later images' verdicts are read all the same (logged), not waited for.
        earlier = [o.read for o in outcomes[:index] if not isinstance(o, BaseException)]
        await ScanVerdicts(earlier).passed()
        if isinstance(refusal, ApplicationError):  # an UploadErrorCode: a fixed vocabulary
            upload_refused(code=refusal.code)
        raise refusal
    images: dict[ImageSource, ValidatedImage] = {}
    reads: list[asyncio.Task[ScanVerdict]] = []
    for source, outcome in zip(sources, outcomes, strict=True):
        assert not isinstance(outcome, BaseException)
        images[source] = outcome.image
        reads.append(outcome.read)
    return images, ScanVerdicts(reads)


def _decided_refusal(scan: ImageScan) -> ApplicationError | None:
    """The refusal of a scan whose outcome needs no clamd, if it is one."""
    if not scan.decided:
        return None
    try:
        scan.result()
    except ApplicationError as refusal:
        return refusal
    return None


async def _image_validate(*, source: ImageSource, limits: UploadLimits, model: str) -> _Validated:
    budget = image_pixel_budget(model=model, detail=source.detail or "auto")
    image_limits = dataclasses.replace(limits, pixel_budget=budget)
    validating = asyncio.ensure_future(
        sync_to_async(upload_validate_image_start, thread_sensitive=False)(
            source=source.url, limits=image_limits, param=source.param
        )
    )
    try:
        # Shielded: the thread runs on when the request is cancelled meanwhile, and the
        # scan it hands back is still read (and closed) then.
        image, scan = await asyncio.shield(validating)
    except asyncio.CancelledError:
        validating.add_done_callback(_read_unclaimed)
        raise
    return _Validated(image, scan, _verdict_read(scan))


def _read_unclaimed(validating: asyncio.Future[tuple[ValidatedImage, ImageScan]]) -> None:
    if not validating.cancelled() and validating.exception() is None:
        _image, scan = validating.result()
        _verdict_read(scan)
