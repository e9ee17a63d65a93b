"""Step 3, cache: answers of deterministic requests, scoped per tenant.

Only requests that always give the same answer are cached: greedy decoding (temperature 0)
or a fixed seed. The key hashes the tenant id with the model, the messages (images by their
content hash) and every sampling parameter, so one tenant's entry can never be found by
another: the tenant is part of what is hashed *and* of the key's readable prefix.

The pipeline looks an answer up before routing; settlement stores a finished one
(``webplatform.completions.settlement``). A cache outage never fails a request: it only
costs speed.
"""

from __future__ import annotations

import hashlib
import logging

import msgspec
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import cache

from inference.protocol import FinishReason, Message, SamplingParams
from webplatform import metrics
from webplatform.completions.answer import Answer

logger = logging.getLogger(__name__)

# Answers that ended on their own; a cancelled one is not the answer.
_CACHEABLE = frozenset({FinishReason.STOP, FinishReason.LENGTH})

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Answer)


def answer_cache_key(
    *, tenant_id: str, model: str, messages: list[Message], sampling: SamplingParams
) -> str:
    canonical = _encoder.encode([tenant_id, model, messages, sampling])
    digest = hashlib.sha256(canonical).hexdigest()
    prefix = settings.ANSWER_CACHE_KEY_PREFIX
    return f"{prefix}:{tenant_id}:{model}:{digest}"


async def answer_cache_lookup(*, key: str) -> Answer | None:
    """The stored answer of ``key``, or None; each lookup is counted as a hit or a miss (an
    unreadable entry or a cache outage is a miss)."""
    answer = await _lookup(key)
    metrics.answer_cache_lookup(hit=answer is not None)
    return answer


async def _lookup(key: str) -> Answer | None:
    try:
        raw = await sync_to_async(cache.get, thread_sensitive=False)(key)
    except Exception:  # a cache outage must not fail requests; it only costs speed
        logger.warning("answer cache lookup failed", exc_info=True)
        return None
    if raw is None:
        return None
    try:
        return _decoder.decode(raw)
    except (msgspec.DecodeError, TypeError):  # an entry of an older format: a miss
        logger.warning("answer cache entry %s is unreadable; ignoring it", key)
        return None


async def answer_cache_store(*, key: str, answer: Answer) -> None:
    if answer.finish_reason not in _CACHEABLE:
        return
    try:
        await sync_to_async(cache.set, thread_sensitive=False)(
            key, _encoder.encode(answer), timeout=settings.ANSWER_CACHE_TTL_SECONDS
        )
    except Exception:
        logger.warning("answer cache store failed", exc_info=True)
