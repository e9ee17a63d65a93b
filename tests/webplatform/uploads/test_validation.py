"""``image_validate``: odd but valid images come out upright, RGB and metadata-free."""

from __future__ import annotations

import hashlib
import io
import struct

import pytest
from django.core.exceptions import ImproperlyConfigured
from PIL import Image, ImageFile

from inference.protocol import ImageRef
from tenants.errors import ApplicationError
from tests.webplatform.uploads import corpus
from webplatform.uploads.validation import (
    ImageType,
    image_type_detect,
    image_validate,
    images_validate_count,
)

MAX_BYTES = 5 * corpus.MIB
MAX_PIXELS = 40_000_000


def validate(data: bytes):
    return image_validate(data=data, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS, param="p")


def png_chunk_types(data: bytes) -> list[bytes]:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    types, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        types.append(data[offset + 4 : offset + 8])
        offset += 12 + length
    return types


def ppm_header(data: bytes) -> tuple[int, int]:
    """Width and height of a binary PPM that holds exactly its header and its RGB bytes."""
    assert data.startswith(b"P6\n")
    _, size, maxval, _ = data.split(b"\n", 3)
    width, height = (int(v) for v in size.split())
    assert maxval == b"255"
    assert len(data) == len(b"P6\n%b\n255\n" % size) + 3 * width * height
    return width, height


def reopen(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def assert_clean_pixels(data: bytes) -> Image.Image:
    """Raw RGB pixels (binary PPM) and nothing else: no EXIF, ICC, text, time, physical
    size, and no byte after the last pixel."""
    width, height = ppm_header(data)
    image = reopen(data)
    assert image.format == "PPM"
    assert image.mode == "RGB"
    assert image.size == (width, height)
    assert not image.getexif()
    return image


def close_to(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 3) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


@pytest.mark.parametrize(
    ("data", "image_type"),
    [
        (corpus.encode(corpus.solid(), "JPEG"), ImageType.JPEG),
        (corpus.encode(corpus.solid(), "PNG"), ImageType.PNG),
        (corpus.encode(corpus.solid(), "WEBP"), ImageType.WEBP),
        (corpus.encode(corpus.solid(), "GIF"), ImageType.GIF),
        (corpus.encode(corpus.solid(), "BMP"), None),
        (corpus.encode(corpus.solid(), "TIFF"), None),
        (corpus.SVG, None),
        (corpus.PDF, None),
        (corpus.HTML, None),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", None),
        (b"", None),
    ],
)
def test_type_comes_from_magic_bytes(data: bytes, image_type: ImageType | None) -> None:
    assert image_type_detect(data) is image_type


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "ICO", "PPM"])
def test_other_formats_pillow_can_read_are_refused(fmt: str) -> None:
    with pytest.raises(ApplicationError) as caught:
        validate(corpus.encode(corpus.solid(size=(16, 16)), fmt))
    assert caught.value.code == "unsupported_image_type"


def test_png_header_on_jpeg_body_fails_to_decode() -> None:
    # Magic bytes pick the one decoder allowed to read the rest; a lie there cannot make
    # Pillow sniff its way to another format.
    jpeg = corpus.encode(corpus.solid(), "JPEG")
    with pytest.raises(ApplicationError) as caught:
        validate(b"\x89PNG\r\n\x1a\n" + jpeg)
    assert caught.value.code == "image_decode_failed"


def test_jpeg_metadata_is_stripped() -> None:
    original = corpus.jpeg_with_metadata()
    assert b"SecretCam" in original and b"secret comment" in original
    result = validate(original)
    image = assert_clean_pixels(result.data)
    assert b"SecretCam" not in result.data and b"secret comment" not in result.data
    assert close_to(image.getpixel((5, 5)), corpus.RED)
    assert (result.width, result.height) == (32, 24)
    assert result.original_type == "image/jpeg"


def test_png_metadata_is_stripped() -> None:
    original = corpus.png_with_metadata()
    assert {b"tEXt", b"iTXt", b"iCCP", b"eXIf"} <= set(png_chunk_types(original))
    result = validate(original)
    image = assert_clean_pixels(result.data)
    assert image.getpixel((0, 0)) == corpus.BLUE


def test_cmyk_jpeg_becomes_rgb() -> None:
    original = corpus.cmyk_jpeg()
    assert Image.open(io.BytesIO(original)).mode == "CMYK"
    image = assert_clean_pixels(validate(original).data)
    assert close_to(image.getpixel((8, 8)), corpus.RED)


def test_16bit_png_is_scaled_not_clipped() -> None:
    original = corpus.png_16bit()
    assert Image.open(io.BytesIO(original)).mode == "I;16"
    image = assert_clean_pixels(validate(original).data)
    assert image.getpixel((0, 0)) == (0, 0, 0)
    assert image.getpixel((0, 1)) == (128, 128, 128)  # 0x8000, not clipped to white
    assert image.getpixel((0, 2)) == (255, 255, 255)


def test_palette_png_transparency_is_composited_onto_white() -> None:
    image = assert_clean_pixels(validate(corpus.palette_png_with_transparency()).data)
    assert image.getpixel((0, 0)) == corpus.WHITE  # transparent black -> white
    assert image.getpixel((12, 4)) == corpus.RED


def test_rgba_and_la_are_composited_onto_white() -> None:
    rgba = assert_clean_pixels(validate(corpus.rgba_png_half_transparent_red()).data)
    assert close_to(rgba.getpixel((0, 0)), (255, 127, 127), tolerance=2)
    la = assert_clean_pixels(validate(corpus.la_png_transparent()).data)
    assert la.getpixel((0, 0)) == corpus.WHITE


def test_animated_gif_keeps_its_first_frame() -> None:
    original = corpus.animated_gif()
    assert Image.open(io.BytesIO(original)).n_frames == 2
    result = validate(original)
    image = assert_clean_pixels(result.data)
    assert (result.width, result.height) == (20, 10)
    assert close_to(image.getpixel((10, 5)), corpus.RED)
    assert result.original_type == "image/gif"


def test_exif_orientation_is_applied_before_stripping() -> None:
    result = validate(corpus.exif_rotated_jpeg())
    image = assert_clean_pixels(result.data)
    assert (result.width, result.height) == (20, 40)  # stored 40x20, shown upright
    assert close_to(image.getpixel((10, 5)), corpus.RED, tolerance=8)
    assert close_to(image.getpixel((10, 34)), corpus.BLUE, tolerance=8)


def test_webp_is_accepted_and_stripped() -> None:
    result = validate(corpus.webp_with_metadata())
    image = assert_clean_pixels(result.data)
    assert (result.width, result.height) == (24, 16)
    assert image.getpixel((3, 3)) == corpus.RED
    assert result.original_type == "image/webp"


def test_result_hashes_and_ref() -> None:
    original = corpus.jpeg_with_metadata()
    result = validate(original)
    assert result.sha256 == hashlib.sha256(result.data).hexdigest()
    assert result.original_sha256 == hashlib.sha256(original).hexdigest()
    assert result.original_size == len(original)
    assert result.ref() == ImageRef(
        sha256=result.sha256, width=32, height=24, media_type="image/x-portable-pixmap"
    )
    assert validate(original).sha256 == result.sha256  # deterministic: cacheable
    assert "data=" not in repr(result)  # no megabytes in logs


def test_truncated_jpeg_is_refused() -> None:
    with pytest.raises(ApplicationError) as caught:
        validate(corpus.truncated_jpeg())
    assert (caught.value.code, caught.value.param) == ("image_decode_failed", "p")


def test_truncated_png_is_refused() -> None:
    whole = corpus.noise_png(50_000)
    with pytest.raises(ApplicationError) as caught:
        validate(whole[: len(whole) // 2])
    assert caught.value.code == "image_decode_failed"


def test_refuses_to_run_when_truncated_images_are_allowed(monkeypatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImproperlyConfigured):
        validate(corpus.truncated_jpeg())


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_cap_never_exceeds_pillows_own(monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ApplicationError) as caught:
        image_validate(
            data=corpus.encode(corpus.solid(size=(11, 10)), "PNG"),
            max_bytes=MAX_BYTES,
            max_pixels=MAX_PIXELS,
        )
    assert caught.value.code == "image_too_many_pixels"


def test_pixel_cap_is_checked_before_the_scan(fake_clamd) -> None:
    with pytest.raises(ApplicationError):
        validate(corpus.png_bomb(8000, 8000, 8))
    assert fake_clamd.streams == []


def test_images_validate_count() -> None:
    images_validate_count(count=0, max_images=4)
    images_validate_count(count=4, max_images=4)
    with pytest.raises(ApplicationError) as caught:
        images_validate_count(count=5, max_images=4, param="messages[2]")
    assert (caught.value.code, caught.value.status, caught.value.param) == (
        "too_many_images",
        400,
        "messages[2]",
    )
