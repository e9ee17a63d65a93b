"""Step 2, validate: every image of the request, through ``webplatform.uploads``.

Size cap, magic bytes, pixel cap, ClamAV on the original bytes, then the image scaled down
to its pixel budget (the model's, for the image's OpenAI ``detail``: ``uploads.budget``)
and handed on as raw pixels, the images of a request at once; the first refusal in the
client's order is the request's error (an ``ApplicationError`` naming the image's field in
``param``).
"""

from __future__ import annotations

import asyncio
import dataclasses

from asgiref.sync import sync_to_async

from tenants.errors import ApplicationError
from webplatform.completions.request import ChatCompletionInput, ImageSource
from webplatform.metrics import upload_refused
from webplatform.uploads.budget import image_pixel_budget
from webplatform.uploads.services import UploadLimits, ValidatedImage, upload_validate_image


async def images_validate(
    *, inp: ChatCompletionInput, limits: UploadLimits
) -> dict[ImageSource, ValidatedImage]:
    """The request's new images, validated and re-encoded (images stored by an earlier turn
    of a conversation were validated then).

    The images are validated at once, each in a thread (decoding and scanning are CPU and IO
    bound: off the event loop; Pillow and the clamd socket release the GIL); the refusal of
    the first refused image in the client's order is the request's error.
    """
    sources = [source for turn in inp.turns for source in turn.images]
    outcomes = await asyncio.gather(
        *(_image_validate(source=source, limits=limits, model=inp.model) for source in sources),
        return_exceptions=True,
    )
    images: dict[ImageSource, ValidatedImage] = {}
    for source, outcome in zip(sources, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            if isinstance(outcome, ApplicationError):  # an UploadErrorCode: a fixed vocabulary
                upload_refused(code=outcome.code)
            raise outcome
        images[source] = outcome
    return images


async def _image_validate(
    *, source: ImageSource, limits: UploadLimits, model: str
) -> ValidatedImage:
    budget = image_pixel_budget(model=model, detail=source.detail or "auto")
    image_limits = dataclasses.replace(limits, pixel_budget=budget)
    return await sync_to_async(upload_validate_image, thread_sensitive=False)(
        source=source.url, limits=image_limits, param=source.param
    )
