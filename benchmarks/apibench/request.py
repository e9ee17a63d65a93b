"""The standard request and the model it asks for.

A ~200 KB noise JPEG as a data URI (a different image in every request, so neither the
answer cache nor the engine's image-embedding cache answers) + a short question, greedy,
``max_tokens`` 8, answer cache off (``"cache": false``).

Every image set takes a ``salt`` (``api.py`` draws one per run and mode): the same count and sizes
of images, other bytes. clamd keeps the verdicts of clean files by digest (its cache), so
a run repeating an earlier run's images would have its scans answered from that cache,
which real uploads, new bytes each, never are.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

MODEL = "glm-4.6v-flash"
QUESTION = "What is in this image?"
MAX_TOKENS = 8
JPEG_TARGET_BYTES = 200_000


def inference_request(ref: Any) -> Any:
    """The standard request as the inference client takes it, for the image ``ref`` (an
    ``inference.protocol.ImageRef``): what the engine-alone setups send."""
    from inference.protocol import (
        ImagePart,
        InferenceRequest,
        Message,
        SamplingParams,
        TextPart,
        new_request_id,
    )

    return InferenceRequest(
        request_id=new_request_id(),
        tenant_id="bench",
        model=MODEL,
        messages=[Message(role="user", content=[ImagePart(image=ref), TextPart(QUESTION)])],
        sampling=SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
        stream=False,
    )


def model_spec(model_dir: Path) -> dict[str, str]:
    """The ``INFERENCE_MODELS`` entry of the tiny checkpoint, for every setup."""
    return {"path": str(model_dir), "dtype": "float32", "device": "cpu"}


def noise_jpeg(target_bytes: int, *, seed: int = 0, side: int = 200, salt: int = 0) -> bytes:
    """A JPEG of random noise of about ``target_bytes`` (noise does not compress)."""
    import numpy as np
    from PIL import Image

    while True:
        rng = np.random.default_rng([salt, seed])
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=85)
        if buffer.tell() >= target_bytes:
            return buffer.getvalue()
        side += 10


def distinct_jpegs(count: int, *, salt: int = 0) -> list[bytes]:
    """``count`` different JPEGs of the same size: every request brings a new image, so the
    engine's image-embedding cache never answers for the vision tower (as in real traffic,
    where a hit needs the same tenant to resend the same image)."""
    first = noise_jpeg(JPEG_TARGET_BYTES, salt=salt)
    side = _side_of(first)
    return [first] + [noise_jpeg(0, seed=seed, side=side, salt=salt) for seed in range(1, count)]


def distinct_photos(count: int, *, salt: int = 0) -> list[bytes]:
    """``count`` different 12 MP phone photos of a label (4000 x 3000 JPEG, ~1-2 MB): small
    print over the whole frame, each with its own noise patch so no two are alike."""
    import numpy as np
    from PIL import Image, ImageDraw

    base = Image.new("RGB", (4000, 3000), (236, 228, 210))
    draw = ImageDraw.Draw(base)
    for y in range(0, 3000, 24):
        for x in range(0, 4000, 200):
            draw.text((x + (y % 48), y), "BEST BEFORE 03/27", fill=(20 + x % 90, 40, 60 + y % 120))
    photos = []
    for seed in range(count):
        rng = np.random.default_rng([salt, seed])
        photo = base.copy()
        patch = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        photo.paste(Image.fromarray(patch, "RGB"), (int(rng.integers(0, 3936)), 1500))
        buffer = io.BytesIO()
        photo.save(buffer, format="JPEG", quality=88)
        photos.append(buffer.getvalue())
    return photos


def distinct_screenshots(count: int, *, salt: int = 0) -> list[bytes]:
    """``count`` different 1920 x 1080 PNG screenshots (flat colours, text, a table): the
    image type that compresses well as PNG and is large as pixels."""
    from PIL import Image, ImageDraw

    shots = []
    for seed in range(count):
        shot = Image.new("RGB", (1920, 1080), (250, 250, 252))
        draw = ImageDraw.Draw(shot)
        draw.rectangle([0, 0, 1920, 64], fill=(32, 48, 80))
        draw.rectangle([0, 64, 260, 1080], fill=(236, 239, 244))
        for row in range(28):
            y = 100 + row * 34
            draw.rectangle([300, y, 1880, y + 30], outline=(210, 214, 220))
            invoice = f"INV-{salt % 10_000:04d}-{seed:04d}-{row:03d}"
            draw.text((312, y + 8), f"{invoice}  Widget {row * 7 % 13}", fill=0)
            draw.text((1500, y + 8), f"{(seed * 31 + row * 977) % 10000 / 100:.2f} EUR", fill=0)
        buffer = io.BytesIO()
        shot.save(buffer, format="PNG")
        shots.append(buffer.getvalue())
    return shots


IMAGE_SETS = {
    "standard": distinct_jpegs,
    "photo": distinct_photos,
    "screenshot": distinct_screenshots,
}


def _side_of(jpeg: bytes) -> int:
    from PIL import Image

    return Image.open(io.BytesIO(jpeg)).width


def request_body(jpeg: bytes, detail: str | None = None) -> bytes:
    """The ``POST /v1/chat/completions`` body carrying ``jpeg`` (or a PNG), with OpenAI's
    ``image_url.detail`` when given."""
    media_type = "image/png" if jpeg.startswith(b"\x89PNG") else "image/jpeg"
    image_url = {"url": f"data:{media_type};base64," + base64.b64encode(jpeg).decode()}
    if detail is not None:
        image_url["detail"] = detail
    body = {
        "model": MODEL,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": image_url},
                    {"type": "text", "text": QUESTION},
                ],
            }
        ],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "cache": False,
    }
    return json.dumps(body).encode()
