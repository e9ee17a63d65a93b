"""Validate image bytes and hand the worker clean pixels.

``image_validate`` is the one gate every image passes, whatever entry point it came from.
Its order puts cheap checks first and lets the virus scanner see the client's bytes:

1. size cap (bytes, from the tenant's plan);
2. type by magic bytes: JPEG, PNG, WEBP or GIF; never the file name or a declared type;
3. header-only open (Pillow reads headers lazily) restricted to the detected format, and the
   pixel cap on the declared dimensions, before any pixel is decoded;
4. virus scan of the original bytes (``scanning.image_scan_start``): sent to clamd, which
   scans them in its own process while steps 5-7 run here; ``image_validate`` returns
   nothing before its verdict, ``image_validate_start`` hands the scan on with the pixels
   for the request path to read its verdict before the answer (the verdict then gates what
   the client sees, not the enqueue); its refusal (malware, or no scanner when one is
   required) is the error even when the decode failed too;
5. decode of the first frame (truncated data is an error, never grey padding), at reduced
   size where the format allows and the image is larger than the model's pixel budget
   (JPEG's DCT scaling, ``Image.draft``: a 12 MP photo decodes at 1/2 or 1/4 scale);
6. EXIF orientation applied, converted to RGB (alpha composited onto white), downscaled to
   the pixel budget (``pixel_budget``: the most pixels the model will see of one image, see
   ``budget.py``) with a quality filter;
7. handed on as raw RGB pixels in a binary PPM (``P6``): a header of the size and the
   pixel bytes, nothing else, so neither metadata nor a trailing payload can ride along.

Why raw pixels and not PNG: the worker decodes every image on the path to its first token,
and a PPM "decodes" by copying (1-2 ms for a megapixel, against ~25 ms for a PNG, and ~220
ms to encode one here); the model sees the same pixels, lossless. The cost is blob size (3
bytes per pixel, at most 3 x the budget per image), which the pixel budget bounds. Pillow
reads PPM natively, so every consumer (the engine, ocr-lite) keeps using Pillow.

Decompression bombs: the pixel cap is checked by us on the header dimensions; Pillow's own
guard (``Image.MAX_IMAGE_PIXELS``) is left at its default as a backstop and its
``DecompressionBombError`` (or the warning, where warnings are errors) is refused with the
same code. We neither lower ``MAX_IMAGE_PIXELS`` nor turn warnings into errors "for the
duration of a call": both are process-wide in Python 3.11 (``warnings.catch_warnings`` is
not thread-safe), so doing so in one request thread changes every other thread's Pillow and
can leak when two requests interleave. Instead the effective cap is
``min(max_pixels, Image.MAX_IMAGE_PIXELS)``, so every image that would make Pillow warn is
already refused by our own check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import io
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from PIL import Image, ImageFile

from inference.client.blobs import DigestedBytes
from inference.protocol import ImageRef
from tenants.errors import ApplicationError
from webplatform.uploads.decoding import image_size_check
from webplatform.uploads.errors import UploadErrorCode, upload_error
from webplatform.uploads.scanning import ImageScan, ScanVerdict, image_scan_start

logger = logging.getLogger(__name__)

OUTPUT_MEDIA_TYPE = "image/x-portable-pixmap"
# Downscaling to the budget: Lanczos after an integer box reduction by about this factor
# (Pillow's ``reducing_gap``): the quality of a full Lanczos at a fraction of its cost.
_REDUCING_GAP = 3.0
_EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageType(enum.Enum):
    """An accepted image type: its media type and the one Pillow plugin allowed to read it."""

    JPEG = ("image/jpeg", "JPEG")
    PNG = ("image/png", "PNG")
    WEBP = ("image/webp", "WEBP")
    GIF = ("image/gif", "GIF")

    def __init__(self, media_type: str, pillow_format: str) -> None:
        self.media_type = media_type
        self.pillow_format = pillow_format


def image_type_detect(data: bytes) -> ImageType | None:
    """The image type the magic bytes announce, or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return ImageType.JPEG
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return ImageType.PNG
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ImageType.WEBP
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return ImageType.GIF
    return None


@dataclass(frozen=True, slots=True)
class ValidatedImage:
    """An image that passed every check: metadata-free RGB pixels (binary PPM) in ``data``,
    at most ``pixel_budget`` of them."""

    data: bytes = field(repr=False)
    sha256: str  # of ``data``, the delivered bytes: the blob store and cache key
    width: int  # of the delivered pixels (after orientation and downscaling)
    height: int
    original_size: int  # bytes the client sent (after base64 decoding)
    original_type: str  # media type detected from the magic bytes, e.g. "image/jpeg"
    original_sha256: str  # of the client's bytes, for logs and abuse reports
    scan: ScanVerdict
    original_width: int = 0  # as the client sent it (stored orientation)
    original_height: int = 0
    media_type: str = OUTPUT_MEDIA_TYPE

    @property
    def downscaled(self) -> bool:
        return self.width * self.height < self.original_width * self.original_height

    def ref(self) -> ImageRef:
        return ImageRef(
            sha256=self.sha256, width=self.width, height=self.height, media_type=self.media_type
        )


def images_validate_count(*, count: int, max_images: int, param: str | None = "messages") -> None:
    """Refuse a request carrying more than ``max_images`` images (``too_many_images``)."""
    if count > max_images:
        raise upload_error(
            UploadErrorCode.TOO_MANY_IMAGES,
            f"The request has {count} images; at most {max_images} are allowed per request.",
            param=param,
        )


def image_validate(
    *,
    data: bytes,
    max_bytes: int,
    max_pixels: int | None = None,
    pixel_budget: int | None = None,
    param: str | None = None,
) -> ValidatedImage:
    """Run steps 1-7 (module docstring) on the client's bytes; ``ApplicationError`` if refused.

    ``max_pixels`` (what is refused) defaults to ``settings.IMAGE_MAX_PIXELS``;
    ``pixel_budget`` (what a larger image is scaled down to) to no downscaling. Blocking and
    CPU-bound: from async code call it in a thread.
    """
    image, scan = image_validate_start(
        data=data,
        max_bytes=max_bytes,
        max_pixels=max_pixels,
        pixel_budget=pixel_budget,
        param=param,
    )
    return dataclasses.replace(image, scan=scan.result())


def image_validate_start(
    *,
    data: bytes,
    max_bytes: int,
    max_pixels: int | None = None,
    pixel_budget: int | None = None,
    param: str | None = None,
) -> tuple[ValidatedImage, ImageScan]:
    """``image_validate`` but for the virus scan's verdict: the image comes back as soon as
    its pixels are ready (``scan`` ``PENDING``) with its scan, still with clamd. Whoever
    calls this must read ``ImageScan.result`` (or ``result_async``) before anything made
    from the image reaches the client, and refuse the request if it raises; the request
    path does (``webplatform.completions.validation.ScanVerdicts``). The pixels may meanwhile
    go on to the worker: they are ours (decoded here, metadata-free), never the client's
    bytes. A refusal of the image's own (bytes, type, pixels, decode) still waits for the
    verdict, which wins over it, as in ``image_validate``.
    """
    if max_pixels is None:
        max_pixels = settings.IMAGE_MAX_PIXELS
    image_size_check(size=len(data), max_bytes=max_bytes, param=param)
    image_type = image_type_detect(data)
    if image_type is None:
        raise upload_error(
            UploadErrorCode.UNSUPPORTED_IMAGE_TYPE,
            "The image type is not supported; send a JPEG, PNG, WEBP or GIF image.",
            param=param,
        )
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise ImproperlyConfigured(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process: truncated uploads "
            "would be accepted with made-up pixels, so image validation refuses to run."
        )
    pillow_limit = Image.MAX_IMAGE_PIXELS
    if pillow_limit is not None:
        max_pixels = min(max_pixels, pillow_limit)

    with _decoding(param):
        image = Image.open(io.BytesIO(data), formats=[image_type.pillow_format])
    with image:
        original_width, original_height = image.size
        _pixels_check(image.size, max_pixels=max_pixels, param=param)
        # The bytes go to clamd first and it scans them in its own process while this
        # thread decodes; the verdict is read after (by image_validate, or by the caller of
        # image_validate_start), and a scan refusal wins over a decode error, as when the
        # scan ran first.
        scan = image_scan_start(data=data, param=param)
        try:
            with _decoding(param):
                target = budget_fit(image.size, pixel_budget)
                if target is not None and image_type is ImageType.JPEG:
                    # Decode at the smallest DCT scale (1/2, 1/4, 1/8) still >= the target.
                    image.draft("RGB", target)
                image.load()  # the first frame only, for animations
                clean = _upright_rgb(image)
                fitted = budget_fit(clean.size, pixel_budget)
                if fitted is not None:
                    clean = clean.resize(
                        fitted, Image.Resampling.LANCZOS, reducing_gap=_REDUCING_GAP
                    )
                encoded = _ppm(clean)
        except BaseException:
            scan.result()  # raises the scan's refusal, if any, instead of the decode error
            raise
    validated = ValidatedImage(
        data=encoded,
        sha256=encoded.sha256,
        width=clean.width,
        height=clean.height,
        original_size=len(data),
        original_type=image_type.media_type,
        original_sha256=hashlib.sha256(data).hexdigest(),
        scan=ScanVerdict.PENDING,
        original_width=original_width,
        original_height=original_height,
    )
    return validated, scan


def budget_fit(size: tuple[int, int], budget: int | None) -> tuple[int, int] | None:
    """The largest size of ``size``'s aspect ratio with at most ``budget`` pixels, or None
    when ``size`` is within it (or there is no budget)."""
    width, height = size
    if budget is None or width * height <= budget:
        return None
    scale = math.sqrt(budget / (width * height))
    fitted_w, fitted_h = max(1, round(width * scale)), max(1, round(height * scale))
    while fitted_w * fitted_h > budget:  # rounding up went over: take a pixel off the side
        # that is furthest above its exact length, which keeps the aspect ratio closest.
        if fitted_w / (width * scale) >= fitted_h / (height * scale) and fitted_w > 1:
            fitted_w -= 1
        else:
            fitted_h -= 1
    return fitted_w, fitted_h


@contextlib.contextmanager
def _decoding(param: str | None) -> Iterator[None]:
    """Turn whatever Pillow raises on hostile bytes into a client error, never a 500."""
    try:
        yield
    except ApplicationError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise upload_error(
            UploadErrorCode.IMAGE_TOO_MANY_PIXELS,
            "The image has too many pixels.",
            param=param,
        ) from exc
    except Exception as exc:
        # Pillow signals corrupt input with OSError, SyntaxError, ValueError, EOFError,
        # struct.error, IndexError... all mean the same thing to the client.
        logger.info("image decode failed: %r", exc)
        raise upload_error(
            UploadErrorCode.IMAGE_DECODE_FAILED,
            "The image could not be decoded; it may be truncated or corrupt.",
            param=param,
        ) from exc


def _pixels_check(size: tuple[int, int], *, max_pixels: int, param: str | None) -> None:
    width, height = size
    if width * height > max_pixels:
        raise upload_error(
            UploadErrorCode.IMAGE_TOO_MANY_PIXELS,
            f"The image is {width}x{height} ({width * height:,} pixels); the limit is "
            f"{max_pixels:,} pixels.",
            param=param,
        )


def _upright_rgb(image: Image.Image) -> Image.Image:
    """Upright RGB pixels (``image`` itself when it already is: no copy). It may still
    carry the upload's ``info``; only its pixels leave this module (``_ppm``)."""
    rgb = _to_rgb(image)
    method = _ORIENTATION_TRANSPOSE.get(_orientation(image))
    if method is not None:
        rgb = rgb.transpose(method)
    return rgb


def _ppm(image: Image.Image) -> DigestedBytes:
    """A binary PPM of an RGB image: a header of its size, then its pixel bytes, with their
    SHA-256. Nothing of ``info`` (EXIF, ICC, XMP, text chunks, comments) nor of the upload's
    bytes is in it. The bytes Pillow's own PPM writer makes, without its ``convert``, fresh
    image and tiled encoder (~2 ms more for a 520 px JPEG). ``DigestedBytes`` copies the
    pixels once more (~0.1 ms for 0.8 MB, here in the validating thread) so that the digest
    travels with them and the event loop does not hash them again (0.45 ms)."""
    assert image.mode == "RGB"
    return DigestedBytes(b"P6\n%d %d\n255\n" % image.size + image.tobytes())


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception as exc:  # unreadable EXIF: keep the pixels as stored
        logger.info("ignoring unreadable EXIF: %r", exc)
        return 1
    return value if isinstance(value, int) else 1


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode.startswith("I"):
        # 16-bit greyscale PNG ("I;16", or "I"): keep the top 8 bits. ``convert`` would clip
        # every value above 255 to white instead of scaling.
        samples = np.asarray(image).astype(np.int64)
        grey = (np.clip(samples, 0, 0xFFFF) >> 8).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        grey = np.clip(np.asarray(image), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    if mode == "RGB":
        return image  # ``convert`` would copy it
    # L, 1, P without transparency, CMYK (Pillow undoes Adobe's inverted CMYK), YCbCr.
    return image.convert("RGB")
