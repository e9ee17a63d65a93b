"""Step 2, validate: every image of the request, through ``webplatform.uploads``.

Size cap, magic bytes, pixel cap, ClamAV on the original bytes, then the image scaled down
to its pixel budget (the model's, for the image's OpenAI ``detail``: ``uploads.budget``)
and handed on as raw pixels, image by image in the order the client sent them; the first refusal is the
request's error (an ``ApplicationError`` naming the image's field in ``param``).
"""

from __future__ import annotations

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
    of a conversation were validated then)."""
    images: dict[ImageSource, ValidatedImage] = {}
    for turn in inp.turns:
        for source in turn.images:
            budget = image_pixel_budget(model=inp.model, detail=source.detail or "auto")
            image_limits = dataclasses.replace(limits, pixel_budget=budget)
            # Decoding and scanning are CPU and IO bound: keep them off the event loop.
            try:
                images[source] = await sync_to_async(upload_validate_image, thread_sensitive=False)(
                    source=source.url, limits=image_limits, param=source.param
                )
            except ApplicationError as exc:  # an UploadErrorCode: a fixed vocabulary
                upload_refused(code=exc.code)
                raise
    return images
