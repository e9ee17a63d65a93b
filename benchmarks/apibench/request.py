"""The standard request and the model it asks for.

A ~200 KB noise JPEG as a data URI (a different image in every request, so neither the
answer cache nor the engine's image-embedding cache answers) + a short question, greedy,
``max_tokens`` 8, answer cache off (``"cache": false``).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

MODEL = "glm-4.6v-flash"
QUESTION = "What is in this image?"
MAX_TOKENS = 8
JPEG_TARGET_BYTES = 200_000


def model_spec(model_dir: Path) -> dict[str, str]:
    """The ``INFERENCE_MODELS`` entry of the tiny checkpoint, for every setup."""
    return {"path": str(model_dir), "dtype": "float32", "device": "cpu"}


def noise_jpeg(target_bytes: int, *, seed: int = 0, side: int = 200) -> bytes:
    """A JPEG of random noise of about ``target_bytes`` (noise does not compress)."""
    import numpy as np
    from PIL import Image

    while True:
        pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=85)
        if buffer.tell() >= target_bytes:
            return buffer.getvalue()
        side += 10


def distinct_jpegs(count: int) -> list[bytes]:
    """``count`` different JPEGs of the same size: every request brings a new image, so the
    engine's image-embedding cache never answers for the vision tower (as in real traffic,
    where a hit needs the same tenant to resend the same image)."""
    first = noise_jpeg(JPEG_TARGET_BYTES)
    side = _side_of(first)
    return [first] + [noise_jpeg(0, seed=seed, side=side) for seed in range(1, count)]


def _side_of(jpeg: bytes) -> int:
    from PIL import Image

    return Image.open(io.BytesIO(jpeg)).width


def request_body(jpeg: bytes) -> bytes:
    """The ``POST /v1/chat/completions`` body carrying ``jpeg``."""
    uri = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    body = {
        "model": MODEL,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": uri}},
                    {"type": "text", "text": QUESTION},
                ],
            }
        ],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "cache": False,
    }
    return json.dumps(body).encode()
