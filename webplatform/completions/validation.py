"""Step 2, validate: every image of the request, through ``webplatform.uploads``.

Size cap, magic bytes, pixel cap, ClamAV on the original bytes, full decode and a clean
re-encode, image by image in the order the client sent them; the first refusal is the
request's error (an ``ApplicationError`` naming the image's field in ``param``).
"""

from __future__ import annotations

from asgiref.sync import sync_to_async

from webplatform.completions.request import ChatCompletionInput, ImageSource
from webplatform.uploads.services import UploadLimits, ValidatedImage, upload_validate_image


async def images_validate(
    *, inp: ChatCompletionInput, limits: UploadLimits
) -> dict[ImageSource, ValidatedImage]:
    """The request's new images, validated and re-encoded (images stored by an earlier turn
    of a conversation were validated then)."""
    images: dict[ImageSource, ValidatedImage] = {}
    for turn in inp.turns:
        for source in turn.images:
            # Decoding and scanning are CPU and IO bound: keep them off the event loop.
            images[source] = await sync_to_async(upload_validate_image, thread_sensitive=False)(
                source=source.url, limits=limits, param=source.param
            )
    return images
