"""Step 2, validate: every image of the request, through ``webplatform.uploads``.

Size cap, magic bytes, pixel cap, ClamAV on the original bytes, then the image scaled down
to its pixel budget (the model's, for the image's OpenAI ``detail``: ``uploads.budget``)
and handed on as raw pixels, the images of a request at once; the first refusal in the
client's order is the request's error (an ``ApplicationError`` naming the image's field in
``param``).

The virus scan's verdicts gate the answer, not the enqueue (``ScanVerdicts``): clamd scans
the client's bytes in its own process, and a scan can take longer than the decode (~9 ms
for a 200 KB JPEG against ~4 ms on the benchmark's machine, hundreds of ms for a large
photo with the official signatures), so the request goes on to the worker with the pixels
while clamd works, and ``CompletionRun.events`` reads every verdict before the client sees
anything: a refusal then cancels the request in the worker and is the request's error, as
if it had come here. What reaches the worker before the verdict is only ever our own
pixels (decoded here, metadata-free), never the client's bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Sequence

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


class ScanVerdicts:
    """The scan verdicts of a request's images, read on the event loop from the moment
    validation hands them on; ``passed()`` waits for all and raises the refusal of the first
    refused image in the client's order. ``close()`` stops reading (a run given up)."""

    def __init__(self, scans: Sequence[ImageScan]) -> None:
        self._task: asyncio.Task[None] | None = None
        if scans:
            self._task = asyncio.ensure_future(_verdicts_read(scans))
            # Its outcome retrieved even when nobody awaits it (a run abandoned before its
            # events), and every connection closed, also those of a read cancelled before
            # it started.
            self._task.add_done_callback(functools.partial(_finished, scans))

    async def passed(self) -> None:
        """Return when every image was found clean (or scanning is off and not required);
        raise the first refusal (``malware_detected``, ``scanner_unavailable``)."""
        if self._task is not None:
            await self._task

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


async def _verdicts_read(scans: Sequence[ImageScan]) -> None:
    outcomes = await asyncio.gather(
        *(scan.result_async() for scan in scans), return_exceptions=True
    )
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            if isinstance(outcome, ApplicationError):
                upload_refused(code=outcome.code)
            raise outcome


def _finished(scans: Sequence[ImageScan], task: asyncio.Task[None]) -> None:
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
    the first refused image in the client's order is the request's error. When one is
    refused here, every other image's verdict is read first, so a scan refusal of an
    earlier image still wins.
    """
    sources = [source for turn in inp.turns for source in turn.images]
    outcomes = await asyncio.gather(
        *(_image_validate(source=source, limits=limits, model=inp.model) for source in sources),
        return_exceptions=True,
    )
    first_refused = next(
        (i for i, outcome in enumerate(outcomes) if isinstance(outcome, BaseException)), None
    )
    if first_refused is not None:
        refusal = outcomes[first_refused]
        assert isinstance(refusal, BaseException)
        before = [o for o in outcomes[:first_refused] if not isinstance(o, BaseException)]
        after = [o for o in outcomes[first_refused:] if not isinstance(o, BaseException)]
        ScanVerdicts([scan for _image, scan in after]).close()
        # An earlier image's scan refusal wins; its verdicts are read first.
        await ScanVerdicts([scan for _image, scan in before]).passed()
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


async def _image_validate(
    *, source: ImageSource, limits: UploadLimits, model: str
) -> tuple[ValidatedImage, ImageScan]:
    budget = image_pixel_budget(model=model, detail=source.detail or "auto")
    image_limits = dataclasses.replace(limits, pixel_budget=budget)
    return await sync_to_async(upload_validate_image_start, thread_sensitive=False)(
        source=source.url, limits=image_limits, param=source.param
    )
