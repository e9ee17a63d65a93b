"""Helpers shared by the websocket chat tests: frames, images, polling, rows."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import sync_to_async

MODEL = "glm-4.6v-flash"
# Generous: the first request of a test loads the engine in its worker thread.
FRAME_TIMEOUT_S = 30.0
# A prompt the tiny model answers at length (about a hundred tokens, greedy): with a paced
# engine its generation is still running seconds after the first delta.
LONG_PROMPT = "zzzzzzzzzzzz"


def png_data_uri(width: int = 28, height: int = 28, *, seed: int = 0) -> str:
    """A deterministic noise PNG as a data URI."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_message(question: str, data_uri: str) -> list[dict[str, Any]]:
    return [
        {"type": "image_url", "image_url": {"url": data_uri}},
        {"type": "text", "text": question},
    ]


async def frames_until_end(
    receive: Callable[[], Awaitable[dict[str, Any]]], *, timeout_s: float = FRAME_TIMEOUT_S
) -> list[dict[str, Any]]:
    """Frames up to and including the first ``done`` or ``error``."""
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout_s):
        while True:
            frame = await receive()
            frames.append(frame)
            if frame["type"] in ("done", "error"):
                return frames


def answer_text(frames: list[dict[str, Any]]) -> str:
    return "".join(f["text"] for f in frames if f["type"] == "delta")


def assert_streamed_answer(frames: list[dict[str, Any]]) -> dict[str, Any]:
    """``start``, one or more ``delta``, then ``done`` and nothing else; returns ``done``."""
    kinds = [f["type"] for f in frames]
    assert kinds[0] == "start", frames
    assert kinds[-1] == "done", frames
    assert set(kinds[1:-1]) == {"delta"}, frames  # at least one delta, all before done
    start, done = frames[0], frames[-1]
    assert start["request_id"].startswith("req_") and start["model"] == MODEL
    assert done["request_id"] == start["request_id"]
    assert answer_text(frames)
    return done


async def wait_for(predicate: Callable[[], Awaitable[Any]], *, timeout_s: float = 5.0) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)


@sync_to_async
def usage_record(request_id: str) -> Any:
    from tenants.models import UsageRecord

    return UsageRecord.objects.filter(request_id=request_id).first()


async def settled_usage_record(request_id: str, *, timeout_s: float = 15.0) -> Any:
    """The request's usage record, once settlement has written it."""
    return await wait_for(lambda: usage_record(request_id), timeout_s=timeout_s)
