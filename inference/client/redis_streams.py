"""The web half of the Redis Streams transport (``redis.asyncio``); the worker half is
``inference.worker.redis_streams``, the keys and entry fields are in ``inference.protocol``.

- ``submit`` appends the encoded request to ``{prefix}:{model}:requests`` and reads the
  reply stream ``{prefix}:reply:{request_id}`` from id 0, blocking with the last id seen, so
  a reader that starts late (or reconnects) misses nothing the stream still holds.
- ``cancel`` sets ``{prefix}:cancel:{request_id}`` with a TTL; the worker checks it each
  step for its running requests and before starting a queued one.
- ``model_health`` reads the worker registry (a ZSET) and each worker's heartbeat key, and
  the group's lag / pending counts from ``XINFO GROUPS``.

One ``redis.asyncio.Redis`` per event loop: a connection belongs to the loop that opened
it, and Django runs sync views' async calls in short-lived loops of their own.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncIterator
from typing import Any, cast

import msgspec
import redis
import redis.asyncio as aioredis
from redis.typing import XReadResponse

from inference.client.base import InferenceClient, ModelHealth, model_health_from_heartbeats
from inference.client.blobs import blob_check_digest
from inference.protocol import (
    EVENT_FIELD,
    GROUP,
    REQUEST_FIELD,
    TERMINAL_EVENTS,
    ErrorCode,
    ErrorEvent,
    Event,
    ImageRef,
    InferenceRequest,
    KeySpace,
    decode_event,
    decode_heartbeat,
    encode,
)
from inference.settings import InferenceSettings

logger = logging.getLogger(__name__)

# Longest single XREAD block: short enough to notice the overall timeout promptly and to
# stay under any socket timeout.
_READ_BLOCK_MS = 1000
_READ_COUNT = 256


class RedisStreamsClient(InferenceClient):
    """``InferenceClient`` over Redis Streams. Safe to share across event loops."""

    def __init__(self, *, settings: InferenceSettings) -> None:
        if not settings.redis_url:
            raise ValueError("the Redis transport needs INFERENCE_REDIS_URL (or REDIS_URL)")
        self.settings = settings
        self.keys = KeySpace(settings.key_prefix)
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis] = (
            weakref.WeakKeyDictionary()
        )

    def _redis(self) -> aioredis.Redis:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = aioredis.Redis.from_url(self.settings.redis_url, health_check_interval=30)
            self._clients[loop] = client
        return client

    async def put_image(self, *, tenant_id: str, data: bytes, ref: ImageRef) -> None:
        blob_check_digest(data=data, ref=ref)
        key = self.keys.blob(tenant_id, ref.sha256)
        ttl = self.settings.blob_ttl_s
        pipe = self._redis().pipeline(transaction=False)
        pipe.set(key, data, nx=True, ex=ttl)  # stored once per tenant and content
        pipe.expire(key, ttl)  # a re-upload keeps it alive for the new request
        await pipe.execute()

    async def submit(
        self, request: InferenceRequest, *, time_limit_s: float | None = None
    ) -> AsyncIterator[Event]:
        if self.settings.models and request.model not in self.settings.models:
            yield ErrorEvent(ErrorCode.MODEL_NOT_FOUND, f"Unknown model '{request.model}'.")
            return
        await self._redis().xadd(
            self.keys.requests(request.model), {REQUEST_FIELD: encode(request)}
        )
        finished = False
        try:
            async for event in self.events(
                request.request_id, time_limit_s=time_limit_s or self.settings.request_timeout_s
            ):
                finished = isinstance(event, TERMINAL_EVENTS)
                yield event
        finally:
            if not finished:
                # The caller stopped listening (client gone) or we timed out: free the slot.
                await self._cancel_quietly(request.request_id)

    async def events(
        self, request_id: str, *, time_limit_s: float, after: str = "0-0"
    ) -> AsyncIterator[Event]:
        """Read a request's reply stream from ``after`` until its terminal event.

        Ends with ``ErrorEvent(TIMEOUT)`` if no terminal event arrives within ``time_limit_s``
        seconds. Does not cancel anything: ``submit`` does that.
        """
        key = self.keys.reply(request_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + time_limit_s
        last_id: bytes | str = after
        client = self._redis()
        while True:
            remaining_ms = int((deadline - loop.time()) * 1000)
            if remaining_ms <= 0:
                yield ErrorEvent(
                    ErrorCode.TIMEOUT,
                    f"No answer within {time_limit_s:g} seconds.",
                    retryable=True,
                )
                return
            resp = await client.xread(
                {key: last_id}, count=_READ_COUNT, block=min(remaining_ms, _READ_BLOCK_MS)
            )
            for entry_id, fields in _xread_entries(resp):
                last_id = entry_id
                try:
                    event = decode_event(fields[EVENT_FIELD])
                except (KeyError, msgspec.DecodeError, msgspec.ValidationError):
                    logger.error("undecodable reply entry on %s", key)
                    continue
                yield event
                if isinstance(event, TERMINAL_EVENTS):
                    return

    async def cancel(self, request_id: str) -> None:
        # Long enough for a request still queued to be seen as cancelled when it is taken.
        ttl = int(max(self.settings.reply_ttl_s, self.settings.request_timeout_s))
        await self._redis().set(self.keys.cancel(request_id), b"1", ex=ttl)

    async def _cancel_quietly(self, request_id: str) -> None:
        try:
            # Shielded: a caller cancelled while we write still gets the mark written.
            await asyncio.shield(self.cancel(request_id))
        except (redis.RedisError, RuntimeError):
            logger.warning("could not mark %s cancelled", request_id)

    async def model_health(self, model: str) -> ModelHealth:
        client = self._redis()
        registry = self.keys.registry(model)
        worker_ids = [_text(w) for w in await client.zrange(registry, 0, -1)]
        beats = []
        if worker_ids:
            raw = await client.mget([self.keys.heartbeat(model, w) for w in worker_ids])
            dead = [w for w, value in zip(worker_ids, raw, strict=True) if value is None]
            beats = [decode_heartbeat(_raw(value)) for value in raw if value is not None]
            if dead:  # their heartbeat expired: forget them
                await client.zrem(registry, *dead)
        waiting, pending = await self._queue_counts(client, model)
        return model_health_from_heartbeats(model, beats, waiting=waiting, pending=pending)

    async def _queue_counts(self, client: aioredis.Redis, model: str) -> tuple[int, int]:
        stream = self.keys.requests(model)
        try:
            groups = await client.xinfo_groups(stream)
        except redis.ResponseError:  # no stream yet: nothing queued
            return 0, 0
        for group in groups:
            if _text(group["name"]) != GROUP:
                continue
            pending = int(group["pending"])
            lag = group.get("lag")
            if lag is None:
                # Redis cannot compute the lag (entries deleted past the group's position):
                # finished entries are deleted, so the stream holds waiting + pending.
                lag = max(0, int(await client.xlen(stream)) - pending)
            return int(lag), pending
        # The group does not exist yet (no worker ever started): everything is waiting.
        return int(await client.xlen(stream)), 0

    async def aclose(self) -> None:
        """Close the connection pool of the current loop (tests; shutdown)."""
        loop = asyncio.get_running_loop()
        client = self._clients.pop(loop, None)
        if client is not None:
            await client.aclose()


# Replies as this client receives them. redis-py declares each reply for every protocol and
# decoding setting; this transport relies on redis-py's defaults, RESP2 and replies left as
# bytes (its URL sets neither ``protocol`` nor ``decode_responses``).


def _xread_entries(reply: XReadResponse) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of an XREAD reply, in order: ``(id, {field: value})``, all bytes.

    RESP2 answers a list of ``[stream, entries]`` pairs, which is the ``list[list[Any]]``
    member of redis-py's ``XReadResponse`` (its dict members are RESP3's); an XREAD has no
    entry deleted under it, so no ``(None, None)`` one.
    """
    pairs = cast("list[list[Any]]", reply)
    return [entry for _stream, entries in pairs or [] for entry in entries]


def _text(value: object) -> str:
    """A reply's name (bytes under RESP2) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _raw(value: bytes | str) -> bytes:
    """A reply's value as bytes: it is bytes already, redis-py's ``str`` is for decoding
    clients."""
    return value if isinstance(value, bytes) else value.encode()
