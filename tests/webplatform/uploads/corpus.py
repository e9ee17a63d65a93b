"""Upload corpus, generated in code: hostile files and valid but awkward images.

Everything is built from scratch (Pillow, or by hand with zlib/struct where Pillow would
refuse to write the file), seeded, so the corpus is the same on every run and no binary
blob sits in the repository. The EICAR test string is assembled from two pieces so this
source file itself never matches an anti-virus signature.
"""

from __future__ import annotations

import base64
import functools
import io
import struct
import zlib

import numpy as np
from PIL import Image, ImageCms
from PIL.PngImagePlugin import PngInfo

MIB = 1024 * 1024
RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


def eicar() -> bytes:
    """The 68-byte EICAR anti-virus test file."""
    return b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def solid(color: tuple[int, ...] = RED, size: tuple[int, int] = (32, 24), mode: str = "RGB"):
    return Image.new(mode, size, color)


def srgb_icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def camera_exif(orientation: int | None = None) -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"  # Make
    exif[0x0110] = "Model 7"  # Model
    exif[0x0131] = "PhotoEditor 1.0"  # Software
    if orientation is not None:
        exif[0x0112] = orientation
    return exif


# --- valid but awkward images -------------------------------------------------------------


def jpeg_with_metadata() -> bytes:
    return encode(
        solid(RED),
        "JPEG",
        quality=95,
        exif=camera_exif().tobytes(),
        icc_profile=srgb_icc(),
        comment=b"secret comment",
    )


def png_with_metadata() -> bytes:
    info = PngInfo()
    info.add_text("Author", "secret author")
    info.add_itxt("Description", "secret description")
    return encode(
        solid(BLUE), "PNG", pnginfo=info, icc_profile=srgb_icc(), exif=camera_exif().tobytes()
    )


def cmyk_jpeg() -> bytes:
    # C=0 M=255 Y=255 K=0 is red.
    return encode(solid((0, 255, 255, 0), mode="CMYK"), "JPEG", quality=95)


def png_16bit() -> bytes:
    """16-bit greyscale: row 0 is 0x0000, row 1 is 0x8000, row 2 is 0xFFFF."""
    rows = np.array([[0x0000] * 16, [0x8000] * 16, [0xFFFF] * 16], dtype=np.uint16)
    image = Image.fromarray(rows)
    assert image.mode == "I;16"
    return encode(image, "PNG")


def palette_png_with_transparency() -> bytes:
    """Paletted; index 0 (black) is fully transparent, index 1 is red. Left half transparent."""
    image = Image.new("P", (16, 8), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    image.paste(1, (8, 0, 16, 8))
    return encode(image, "PNG", transparency=0)


def rgba_png_half_transparent_red() -> bytes:
    return encode(solid((255, 0, 0, 128), mode="RGBA"), "PNG")


def la_png_transparent() -> bytes:
    return encode(solid((0, 0), mode="LA"), "PNG")


def animated_gif() -> bytes:
    """Two frames: red, then blue."""
    frames = [solid(RED, (20, 10)).convert("P"), solid(BLUE, (20, 10)).convert("P")]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_rotated_jpeg() -> bytes:
    """Stored 40x20, left half red, right half blue, EXIF orientation 6 (rotate 90 CW).

    Displayed upright it is 20x40 with red on top.
    """
    image = solid(BLUE, (40, 20))
    image.paste(RED, (0, 0, 20, 20))
    return encode(image, "JPEG", quality=95, exif=camera_exif(orientation=6).tobytes())


def webp_with_metadata() -> bytes:
    return encode(
        solid(RED, (24, 16)),
        "WEBP",
        lossless=True,
        exif=camera_exif().tobytes(),
        icc_profile=srgb_icc(),
    )


def noise_png(target_bytes: int) -> bytes:
    """Random RGB noise: PNG cannot compress it, so the file is about ``target_bytes``."""
    side = int((target_bytes / 3) ** 0.5) + 1
    pixels = np.random.default_rng(7).integers(0, 256, (side, side, 3), dtype=np.uint8)
    data = encode(Image.fromarray(pixels, "RGB"), "PNG", compress_level=1)
    assert len(data) >= target_bytes
    return data


def noise_jpeg(side: int) -> bytes:
    pixels = np.random.default_rng(3).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels, "RGB"), "JPEG", quality=90)


# --- hostile or broken files --------------------------------------------------------------


def truncated_jpeg() -> bytes:
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    whole = encode(Image.fromarray(noise, "RGB"), "JPEG", quality=90)
    return whole[: len(whole) // 2]


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@functools.cache
def png_bomb(width: int = 50_000, height: int = 50_000, bit_depth: int = 1) -> bytes:
    """A greyscale PNG whose all-zero pixel data deflates ~1000:1: tiny file, huge image.

    50000x50000 at 1 bit is 2.5 gigapixels (312 MB of raw rows) in about 300 KB.
    """
    row = b"\x00" * (1 + (width * bit_depth + 7) // 8)  # filter byte + packed samples
    deflate = zlib.compressobj(9)
    rows_per_block = 1024
    idat = bytearray()
    for start in range(0, height, rows_per_block):
        idat += deflate.compress(row * min(rows_per_block, height - start))
    idat += deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", bytes(idat))
        + _png_chunk(b"IEND", b"")
    )


def gif_frame_outgrows_screen(frame_width: int, frame_height: int) -> bytes:
    """A GIF whose logical screen is 1x1 but whose first frame claims to be much larger."""
    out = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    out += b"\x2c" + struct.pack("<HHHHB", 0, 0, frame_width, frame_height, 0)
    return out + b"\x02\x02\x4c\x01\x00" + b"\x3b"


SVG = (
    b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
    b'<script>alert(document.cookie)</script><rect width="10" height="10"/></svg>'
)
PDF = (
    b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n"
    b"2 0 obj << /Type /Pages /Kids [] /Count 0 >> endobj\n"
    b"trailer << /Root 1 0 R >>\n%%EOF\n"
)
HTML = b"<!DOCTYPE html><html><body><script>fetch('/v1/keys')</script></body></html>"


def png_carrying_eicar() -> bytes:
    """A valid PNG with the EICAR string in a tEXt chunk: a polyglot only a scanner sees."""
    info = PngInfo()
    info.add_text("Comment", eicar().decode("ascii"))
    return encode(solid(RED), "PNG", pnginfo=info)


def jpeg_followed_by_eicar() -> bytes:
    """A valid JPEG with EICAR appended after its end-of-image marker."""
    return encode(solid(RED), "JPEG", quality=90) + eicar()
