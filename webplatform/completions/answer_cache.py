"""Answer cache for deterministic requests, scoped per tenant.

Only requests that always give the same answer are cached: greedy decoding (temperature 0)
or a fixed seed. The key hashes the tenant id with the model, the messages (images by their
content hash) and every sampling parameter, so one tenant's entry can never be found by
another: the tenant is part of what is hashed *and* of the key's readable prefix.
"""

from __future__ import annotations

import hashlib
import logging

import msgspec
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import cache

from inference.protocol import Message, SamplingParams, Usage

logger = logging.getLogger(__name__)


class CachedAnswer(msgspec.Struct, frozen=True):
    text: str
    reasoning: str
    finish_reason: str
    usage: Usage


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(CachedAnswer)


def cache_key(
    *, tenant_id: str, model: str, messages: list[Message], sampling: SamplingParams
) -> str:
    canonical = _encoder.encode([tenant_id, model, messages, sampling])
    digest = hashlib.sha256(canonical).hexdigest()
    prefix = settings.ANSWER_CACHE_KEY_PREFIX
    return f"{prefix}:{tenant_id}:{model}:{digest}"


async def cache_lookup(*, key: str):  # -> CompletionOutcome | None
    from webplatform.completions.run import CompletionOutcome

    try:
        raw = await sync_to_async(cache.get, thread_sensitive=False)(key)
    except Exception:  # a cache outage must not fail requests; it only costs speed
        logger.warning("answer cache lookup failed", exc_info=True)
        return None
    if raw is None:
        return None
    try:
        answer = _decoder.decode(raw)
    except (msgspec.DecodeError, TypeError):  # an entry of an older format: a miss
        logger.warning("answer cache entry %s is unreadable; ignoring it", key)
        return None
    return CompletionOutcome(
        text=answer.text,
        reasoning=answer.reasoning,
        finish_reason=answer.finish_reason,
        usage=answer.usage,
        cache_hit=True,
    )


async def cache_store(*, key: str, outcome) -> None:  # outcome: CompletionOutcome
    if outcome.finish_reason not in ("stop", "length"):
        return
    data = _encoder.encode(
        CachedAnswer(
            text=outcome.text,
            reasoning=outcome.reasoning,
            finish_reason=outcome.finish_reason,
            usage=outcome.usage,
        )
    )
    try:
        await sync_to_async(cache.set, thread_sensitive=False)(
            key, data, timeout=settings.ANSWER_CACHE_TTL_SECONDS
        )
    except Exception:
        logger.warning("answer cache store failed", exc_info=True)
