"""``upload_validate_image`` end to end: the corpus of bad uploads, each with its answer."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable

import pytest
from PIL import Image

from tenants.errors import ApplicationError
from tests.webplatform.uploads import corpus
from webplatform.uploads.scanning import ScanVerdict
from webplatform.uploads.services import (
    DEFAULT_IMAGE_MAX_BYTES,
    UploadLimits,
    ValidatedImage,
    upload_validate_image,
)

PARAM = "messages[0].content[1].image_url"
LIMITS = UploadLimits(max_bytes=5 * corpus.MIB, max_pixels=40_000_000, max_images=4)

BAD_UPLOADS: dict[str, tuple[Callable[[], str | bytes], str, int]] = {
    "truncated jpeg": (
        lambda: corpus.data_uri(corpus.truncated_jpeg()),
        "image_decode_failed",
        400,
    ),
    "png bomb 50000x50000": (
        lambda: corpus.data_uri(corpus.png_bomb()),
        "image_too_many_pixels",
        400,
    ),
    "png 8000x8000 (under Pillow's limit, over ours)": (
        lambda: corpus.data_uri(corpus.png_bomb(8000, 8000, 8)),
        "image_too_many_pixels",
        400,
    ),
    "png 10000x10000 (Pillow warns)": (
        lambda: corpus.data_uri(corpus.png_bomb(10_000, 10_000, 1)),
        "image_too_many_pixels",
        400,
    ),
    "gif frame outgrows its 1x1 screen": (
        lambda: corpus.data_uri(corpus.gif_frame_outgrows_screen(7000, 7000)),
        "image_too_many_pixels",
        400,
    ),
    "gif frame 20000x20000": (
        lambda: corpus.data_uri(corpus.gif_frame_outgrows_screen(20_000, 20_000)),
        "image_too_many_pixels",
        400,
    ),
    "svg": (lambda: corpus.data_uri(corpus.SVG, "image/svg+xml"), "unsupported_image_type", 400),
    "svg declared as png": (lambda: corpus.data_uri(corpus.SVG), "unsupported_image_type", 400),
    "pdf renamed png": (lambda: corpus.data_uri(corpus.PDF), "unsupported_image_type", 400),
    "html": (lambda: corpus.data_uri(corpus.HTML, "image/jpeg"), "unsupported_image_type", 400),
    "raw pdf bytes": (lambda: corpus.PDF, "unsupported_image_type", 400),
    # Bare EICAR is no image: the magic-byte check refuses it before the scanner runs.
    "bare eicar": (lambda: corpus.data_uri(corpus.eicar()), "unsupported_image_type", 400),
    "invalid base64": (lambda: "data:image/png;base64,iVBOR%%%w0KGgo=", "invalid_image_data", 400),
    "invalid bare base64": (lambda: "not base64 at all!", "invalid_image_data", 400),
    "data uri not base64": (lambda: "data:image/png,%89PNG", "invalid_image_data", 400),
    "empty data uri": (lambda: "data:image/png;base64,", "invalid_image_data", 400),
    "empty bytes": (lambda: b"", "invalid_image_data", 400),
    "6 MB image": (lambda: corpus.noise_png(6 * corpus.MIB), "image_too_large", 400),
    "6 MB image in a data uri": (
        lambda: corpus.data_uri(corpus.noise_png(6 * corpus.MIB)),
        "image_too_large",
        400,
    ),
    "60 MB base64 string": (lambda: "A" * (60 * corpus.MIB), "image_too_large", 400),
    "remote url, host not allowlisted": (
        lambda: "https://evil.example/cat.png",
        "image_url_not_allowed",
        400,
    ),
    "cloud metadata url": (
        lambda: "http://169.254.169.254/latest/meta-data/",
        "image_url_not_allowed",
        400,
    ),
    "file url": (lambda: "file:///etc/passwd", "image_url_not_allowed", 400),
}


# Pillow warns about this one before our own check refuses it; the warning is expected.
_EXPECTED_WARNING = {
    "png 10000x10000 (Pillow warns)": pytest.mark.filterwarnings(
        "ignore::PIL.Image.DecompressionBombWarning"
    )
}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=_EXPECTED_WARNING.get(n, ())) for n in BAD_UPLOADS]
)
def test_bad_upload_is_refused_with_its_code(name: str) -> None:
    build, code, status = BAD_UPLOADS[name]
    with pytest.raises(ApplicationError) as caught:
        upload_validate_image(source=build(), limits=LIMITS, param=PARAM)
    assert (caught.value.code, caught.value.status) == (code, status)
    assert caught.value.param == PARAM
    assert caught.value.type == "invalid_request_error"


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_pillow_bomb_warning_raised_as_error_is_refused_too() -> None:
    with pytest.raises(ApplicationError) as caught:
        upload_validate_image(source=corpus.png_bomb(10_000, 10_000, 1), limits=LIMITS)
    assert caught.value.code == "image_too_many_pixels"


def test_too_many_images() -> None:
    LIMITS.check_count(4)
    with pytest.raises(ApplicationError) as caught:
        LIMITS.check_count(5)
    assert (caught.value.code, caught.value.status, caught.value.param) == (
        "too_many_images",
        400,
        "messages",
    )


def test_limits_default_from_settings(settings) -> None:
    settings.IMAGE_MAX_PIXELS = 1234
    settings.IMAGE_MAX_PER_REQUEST = 2
    limits = UploadLimits()
    assert (limits.max_bytes, limits.max_pixels, limits.max_images) == (
        DEFAULT_IMAGE_MAX_BYTES,
        1234,
        2,
    )
    with pytest.raises(ApplicationError) as caught:
        upload_validate_image(source=corpus.encode(corpus.solid(size=(50, 50)), "PNG"))
    assert caught.value.code == "image_too_many_pixels"


def test_pixel_cap_counts_width_times_height() -> None:
    limits = UploadLimits(max_bytes=LIMITS.max_bytes, max_pixels=32 * 24, max_images=1)
    image = corpus.encode(corpus.solid(size=(32, 24)), "PNG")
    assert upload_validate_image(source=image, limits=limits).width == 32
    bigger = corpus.encode(corpus.solid(size=(33, 24)), "PNG")
    with pytest.raises(ApplicationError) as caught:
        upload_validate_image(source=bigger, limits=limits)
    assert caught.value.code == "image_too_many_pixels"


def test_size_cap_is_the_plans_limit() -> None:
    image = corpus.noise_png(100_000)
    assert upload_validate_image(source=image, limits=UploadLimits(max_bytes=len(image)))
    with pytest.raises(ApplicationError) as caught:
        upload_validate_image(source=image, limits=UploadLimits(max_bytes=len(image) - 1))
    assert caught.value.code == "image_too_large"


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda b: corpus.data_uri(b, "image/jpeg"), id="data-uri"),
        pytest.param(lambda b: corpus.data_uri(b, "image/png"), id="data-uri-declaring-png"),
        pytest.param(lambda b: base64.b64encode(b).decode(), id="bare-base64"),
        pytest.param(lambda b: b, id="raw-bytes"),
    ],
)
def test_every_source_form_gives_the_same_image(wrap) -> None:
    jpeg = corpus.jpeg_with_metadata()
    image = upload_validate_image(source=wrap(jpeg), limits=LIMITS, param=PARAM)
    assert isinstance(image, ValidatedImage)
    assert image.original_type == "image/jpeg"  # the bytes decide, not the declared type
    assert image.original_size == len(jpeg)
    assert image.media_type == "image/x-portable-pixmap"
    assert image.scan is ScanVerdict.SKIPPED  # scanning is off in these tests
    reference = upload_validate_image(source=jpeg, limits=LIMITS)
    assert image.sha256 == reference.sha256


def test_valid_upload_scanned_by_real_clamd(real_clamd) -> None:
    image = upload_validate_image(
        source=corpus.data_uri(corpus.jpeg_with_metadata()), limits=LIMITS, param=PARAM
    )
    assert image.scan is ScanVerdict.CLEAN


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(corpus.png_carrying_eicar, id="eicar-in-png-text-chunk"),
        pytest.param(corpus.jpeg_followed_by_eicar, id="eicar-after-jpeg-end"),
    ],
)
def test_eicar_in_a_data_uri_is_malware(real_clamd, build) -> None:
    with pytest.raises(ApplicationError) as caught:
        upload_validate_image(source=corpus.data_uri(build()), limits=LIMITS, param=PARAM)
    error = caught.value
    assert (error.code, error.status, error.param) == ("malware_detected", 400, PARAM)
    assert "EICAR" not in error.message  # the signature name stays in our logs


def test_scanner_sees_the_original_bytes_not_the_reencoded_ones(real_clamd, settings) -> None:
    carrier = corpus.png_carrying_eicar()
    # Re-encoding drops the text chunk: the cleaned image carries no EICAR...
    settings.CLAMD_URL = ""
    settings.CLAMD_REQUIRED = False
    cleaned = upload_validate_image(source=carrier, limits=LIMITS)
    assert corpus.eicar() not in cleaned.data
    # ...and passes the real scanner, while the original is refused: so the scanner got the
    # client's bytes.
    settings.CLAMD_URL = real_clamd
    settings.CLAMD_REQUIRED = True
    # (the delivered pixels, as a PNG the upload path accepts)
    buffer = io.BytesIO()
    Image.open(io.BytesIO(cleaned.data)).save(buffer, format="PNG")
    assert upload_validate_image(source=buffer.getvalue(), limits=LIMITS).scan is ScanVerdict.CLEAN
    with pytest.raises(ApplicationError) as caught:
        upload_validate_image(source=carrier, limits=LIMITS)
    assert caught.value.code == "malware_detected"
