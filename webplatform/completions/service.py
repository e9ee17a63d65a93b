"""The one request path of DESIGN.md, steps 2-7, shared by REST, websocket and playground.

``chat_completion_start`` admits, validates, looks up the cache, picks a model (or a
fallback), submits, and returns a ``CompletionRun`` whose ``events()`` streams the answer and
settles the request (usage record, quota settlement, cache store) exactly once when the
stream ends, fails or is abandoned. Entry points only translate wire formats.
"""

from __future__ import annotations

import time

from asgiref.sync import sync_to_async
from django.conf import settings

from inference.client import get_inference_client
from inference.protocol import (
    ImagePart,
    ImageRef,
    InferenceRequest,
    Message,
    SamplingParams,
    TextPart,
    new_request_id,
)
from tenants.errors import ApplicationError
from tenants.services.quotas import quota_admit, quota_release
from webplatform.completions import answer_cache
from webplatform.completions.inputs import ChatCompletionInput, ImageSource, StoredImage
from webplatform.completions.routing import model_route

# The run and its types live in run.py; entry points import them from here with the service.
from webplatform.completions.run import (
    Caller,
    CompletionOutcome,
    CompletionRun,
    TextDelta,
)
from webplatform.uploads.services import UploadLimits, ValidatedImage, upload_validate_image

__all__ = [
    "Caller",
    "CompletionOutcome",
    "CompletionRun",
    "TextDelta",
    "chat_completion_start",
]


def _inference_messages(
    inp: ChatCompletionInput, images: dict[ImageSource, ValidatedImage]
) -> list[Message]:
    messages = []
    for turn in inp.turns:
        parts: list[TextPart | ImagePart] = []
        for part in turn.parts:
            if isinstance(part, ImageSource):
                parts.append(ImagePart(image=images[part].ref()))
            elif isinstance(part, StoredImage):
                ref = ImageRef(sha256=part.sha256, width=part.width, height=part.height)
                parts.append(ImagePart(image=ref))
            else:
                parts.append(TextPart(text=part))
        messages.append(Message(role=turn.role, content=parts))  # type: ignore[arg-type]
    return messages


def _prompt_token_estimate(inp: ChatCompletionInput) -> int:
    """A cheap upper-side guess of the prompt's tokens for the daily-token reservation.

    Images are not counted: their token count is known only after validation, and settlement
    charges the real figure anyway.
    """
    chars = sum(len(p) for turn in inp.turns for p in turn.parts if isinstance(p, str))
    return chars // 3 + 16 * len(inp.turns)


async def chat_completion_start(
    *, caller: Caller, inp: ChatCompletionInput, request_id: str | None = None
) -> CompletionRun:
    """Steps 2-5 of the request path. Raises ``ApplicationError`` for anything refused.

    ``request_id``: the id the entry point already showed the client (``x-request-id``);
    a new one when None.
    """
    limits = caller.principal.limits
    if inp.model not in caller.principal.allowed_models:
        raise ApplicationError(
            f"The model '{inp.model}' does not exist or you do not have access to it.",
            code="model_not_found",
            status=404,
            param="model",
        )
    max_tokens = inp.max_tokens or min(limits.max_output_tokens, 1024)
    if max_tokens > limits.max_output_tokens:
        raise ApplicationError(
            f"max_tokens is too large: {max_tokens}. This plan allows at most "
            f"{limits.max_output_tokens} completion tokens.",
            code="max_tokens_too_large",
            param="max_tokens",
        )
    upload_limits = UploadLimits(
        max_bytes=limits.max_image_bytes,
        max_pixels=settings.IMAGE_MAX_PIXELS,
        max_images=settings.IMAGE_MAX_PER_REQUEST,
    )
    upload_limits.check_count(inp.image_count)

    admission = await sync_to_async(quota_admit, thread_sensitive=False)(
        tenant_id=caller.principal.tenant_id,
        limits=limits,
        reserve_tokens=max_tokens + _prompt_token_estimate(inp),
    )
    try:
        images: dict[ImageSource, ValidatedImage] = {}
        for turn in inp.turns:
            for source in turn.images:
                # Decoding and scanning are CPU and IO bound: keep them off the event loop.
                images[source] = await sync_to_async(upload_validate_image, thread_sensitive=False)(
                    source=source.url, limits=upload_limits, param=source.param
                )
        client = get_inference_client()
        request_id = request_id or new_request_id()
        tenant_id = str(caller.tenant.pk)
        sampling = SamplingParams(
            max_tokens=max_tokens,
            temperature=inp.temperature,
            top_p=inp.top_p,
            stop=list(inp.stop),
            seed=inp.seed,
            thinking=inp.thinking,
        )
        messages = _inference_messages(inp, images)
        cache_key = None
        cached = None
        if inp.deterministic and inp.use_cache:
            cache_key = answer_cache.cache_key(
                tenant_id=tenant_id, model=inp.model, messages=messages, sampling=sampling
            )
            cached = await answer_cache.cache_lookup(key=cache_key)
        model = inp.model
        inference_request = None
        if cached is None:
            model = await model_route(
                client=client, model=inp.model, fallback=limits.fallback_model
            )
            for image in images.values():
                await client.put_image(tenant_id=tenant_id, data=image.data, ref=image.ref())
            inference_request = InferenceRequest(
                request_id=request_id,
                tenant_id=tenant_id,
                model=model,
                messages=messages,
                sampling=sampling,
                stream=inp.stream,
            )
            if model != inp.model:
                cache_key = None  # a fallback's answer must not stand in for the model's
    except BaseException:
        await sync_to_async(quota_release, thread_sensitive=False)(admission=admission)
        raise
    return CompletionRun(
        request_id=request_id,
        model=model,
        requested_model=inp.model,
        created=int(time.time()),
        admission=admission,
        caller=caller,
        input=inp,
        images=list(images.values()),
        inference_request=inference_request,
        cached=cached,
        cache_key=cache_key,
        client=client,
    )
