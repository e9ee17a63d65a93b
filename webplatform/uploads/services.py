"""The entry point for images from any channel: ``upload_validate_image``.

The REST API, the websocket chat and the playground all hand what the client sent (a data
URI, bare base64, an ``http(s)`` URL, or raw bytes from a form) to ``upload_validate_image``
with the tenant's ``UploadLimits``, and count images with ``UploadLimits.check_count``
before validating any. Each refusal is an ``ApplicationError`` (codes in ``errors.py``).

Pipeline, cheapest first: parse (data URI / base64 / URL policy, size estimated from the
encoded length before decoding) -> fetch, for an allowlisted URL only -> ``image_validate``
(size cap, magic bytes, header pixel cap, virus scan of the original bytes, decode, scaled
down to the pixel budget, handed on as metadata-free raw RGB pixels).

Blocking and CPU-bound: async callers run it in a thread
(``sync_to_async(upload_validate_image, thread_sensitive=False)``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from django.conf import settings

from webplatform.uploads.decoding import RemoteImage, image_source_parse
from webplatform.uploads.fetching import remote_image_fetch
from webplatform.uploads.scanning import (
    ImageScan,
    ScanVerdict,
    scanning_enabled,
    scanning_required,
)
from webplatform.uploads.validation import (
    ValidatedImage,
    image_validate_start,
    images_validate_count,
)

__all__ = [
    "DEFAULT_IMAGE_MAX_BYTES",
    "ImageScan",
    "ScanVerdict",
    "UploadLimits",
    "ValidatedImage",
    "images_validate_count",
    "scanning_enabled",
    "scanning_required",
    "upload_validate_image",
    "upload_validate_image_start",
]

# Used when a caller has no plan at hand; the plan's own limit is what requests should pass.
DEFAULT_IMAGE_MAX_BYTES = 5 * 1024 * 1024


def _settings_max_pixels() -> int:
    return settings.IMAGE_MAX_PIXELS


def _settings_max_images() -> int:
    return settings.IMAGE_MAX_PER_REQUEST


@dataclass(frozen=True, slots=True)
class UploadLimits:
    """Per-request image limits: ``max_bytes`` from the tenant's plan, the rest from settings
    (read when the limits are built, so ``override_settings`` applies). ``pixel_budget``:
    what a larger image is scaled down to (``budget.image_pixel_budget``; None: kept whole)."""

    max_bytes: int = DEFAULT_IMAGE_MAX_BYTES
    max_pixels: int = field(default_factory=_settings_max_pixels)
    max_images: int = field(default_factory=_settings_max_images)
    pixel_budget: int | None = None

    def check_count(self, count: int, *, param: str | None = "messages") -> None:
        """Refuse more than ``max_images`` images in one request (``too_many_images``)."""
        images_validate_count(count=count, max_images=self.max_images, param=param)


def upload_validate_image(
    *, source: str | bytes, limits: UploadLimits | None = None, param: str | None = None
) -> ValidatedImage:
    """Parse, fetch if allowed, validate, scan and re-encode one image.

    ``param`` is the field path for error messages, e.g. ``messages[0].content[1].image_url``.
    """
    image, scan = upload_validate_image_start(source=source, limits=limits, param=param)
    return dataclasses.replace(image, scan=scan.result())


def upload_validate_image_start(
    *, source: str | bytes, limits: UploadLimits | None = None, param: str | None = None
) -> tuple[ValidatedImage, ImageScan]:
    """``upload_validate_image`` without waiting for the virus scan's verdict: the caller
    reads it (``ImageScan.result_async``) before the client sees anything made from the
    image (``validation.image_validate_start``)."""
    limits = limits if limits is not None else UploadLimits()
    parsed = image_source_parse(source=source, max_bytes=limits.max_bytes, param=param)
    if isinstance(parsed, RemoteImage):
        data = remote_image_fetch(url=parsed.url, max_bytes=limits.max_bytes, param=param)
    else:
        data = parsed.data
    return image_validate_start(
        data=data,
        max_bytes=limits.max_bytes,
        max_pixels=limits.max_pixels,
        pixel_budget=limits.pixel_budget,
        param=param,
    )
