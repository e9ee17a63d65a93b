"""Error codes for image uploads, and the one helper that builds their ``ApplicationError``.

Status policy: every refusal caused by the upload itself is HTTP 400 with type
``invalid_request_error``, the code telling which rule it broke. 400 and not 413/422 because
these limits apply to one field inside a JSON body (the whole body's size is the web
server's concern), and because the OpenAI SDKs turn 400 into ``BadRequestError`` while they
turn 413/422 into less specific exceptions. ``scanner_unavailable`` is the one 5xx: the
upload may be fine, our scanner is not, so it is 503 ``server_error`` with ``Retry-After``.
"""

from __future__ import annotations

import enum

from tenants.errors import ApplicationError


class UploadErrorCode(enum.StrEnum):
    IMAGE_TOO_LARGE = "image_too_large"  # more bytes than the plan allows
    UNSUPPORTED_IMAGE_TYPE = "unsupported_image_type"  # magic bytes are not JPEG/PNG/WEBP/GIF
    IMAGE_DECODE_FAILED = "image_decode_failed"  # truncated or corrupt image data
    IMAGE_TOO_MANY_PIXELS = "image_too_many_pixels"  # width * height over the pixel cap
    MALWARE_DETECTED = "malware_detected"  # the virus scanner found something
    TOO_MANY_IMAGES = "too_many_images"  # more images in one request than allowed
    INVALID_IMAGE_DATA = "invalid_image_data"  # not a data URI / base64 we can read, or empty
    IMAGE_URL_NOT_ALLOWED = "image_url_not_allowed"  # remote URL whose host is not allowlisted
    IMAGE_FETCH_FAILED = "image_fetch_failed"  # allowlisted URL that could not be fetched
    SCANNER_UNAVAILABLE = "scanner_unavailable"  # 503: scanning is required and clamd failed


SCANNER_RETRY_AFTER_SECONDS = 10


def upload_error(code: UploadErrorCode, message: str, *, param: str | None) -> ApplicationError:
    """The ``ApplicationError`` for ``code``: 400 for the client's fault, 503 for ours."""
    if code is UploadErrorCode.SCANNER_UNAVAILABLE:
        return ApplicationError(
            message,
            code=code.value,
            status=503,
            type="server_error",
            param=param,
            headers={"Retry-After": str(SCANNER_RETRY_AFTER_SECONDS)},
        )
    return ApplicationError(message, code=code.value, status=400, param=param)
