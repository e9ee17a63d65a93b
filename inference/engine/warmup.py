"""The dummy prefill of ``Engine.warmup``: one small image and a question, in two chunks.

It goes through every prefill stage a request does (image preprocessing, the vision tower,
embeddings and M-RoPE positions, chunked text prefill into a slot), so first-call costs
(kernel selection, allocator growth, lazy imports) are paid before the first request.
It writes into ``slot``, which must be free; the image-embedding cache is not touched.
"""

from __future__ import annotations

import io

from inference.engine.kv_cache import SlotKVCache
from inference.engine.runner import ModelRunner
from inference.protocol import ImagePart, ImageRef, Message, TextPart

_WARMUP_IMAGE = "warmup"


def _png(size: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (127, 127, 127)).save(buffer, format="PNG")
    return buffer.getvalue()


def warm_prefill(runner: ModelRunner, cache: SlotKVCache, *, slot: int) -> int:
    """Prefill a dummy prompt into ``slot``; returns its length (0 when none fits a slot)."""
    ref = ImageRef(sha256=_WARMUP_IMAGE, width=56, height=56)
    question = TextPart("Describe the picture.")
    contents: list[list[TextPart | ImagePart]] = [[ImagePart(ref), question], [question]]
    for content in contents:
        messages = [Message(role="user", content=content)]
        images = runner.process_images(messages, {_WARMUP_IMAGE: _png(56)}, scope="warmup")
        prompt = runner.build_prompt(messages, images, thinking=False)
        if prompt.length <= cache.max_len:
            break
    else:
        return 0
    [encoded] = runner.encode_images([prompt], None)
    job = runner.begin_prefill(prompt, encoded)
    middle = max(1, job.length // 2)
    for end in (middle, job.length):
        if end > job.done:
            runner.prefill_chunk(cache, job, slot, end)
    return job.length
