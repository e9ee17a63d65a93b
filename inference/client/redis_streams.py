"""The web half of the Redis Streams transport (``redis.asyncio``); the worker half is
``inference.worker.redis_streams``, the keys and entry fields are in ``inference.protocol``.

- ``submit`` appends the encoded request to ``{prefix}:{model}:requests`` and reads the
  reply stream ``{prefix}:reply:{request_id}`` from id 0, blocking with the last id seen, so
  a reader that starts late (or reconnects) misses nothing the stream still holds.
- ``cancel`` sets ``{prefix}:cancel:{request_id}`` with a TTL; the worker checks it each
  step for its running requests and before starting a queued one.
- ``model_health`` reads the worker registry (a ZSET), each worker's heartbeat key and
  presence subscription, and the group's lag / pending counts from ``XINFO GROUPS``, in
  one script, and keeps the
  answer for ``health_cache_s`` (a quarter second by default, the heartbeat interval), so
  routing costs a round trip per model and process a few times a second, not per request.
- ``put_image`` only stages the bytes in this process; ``submit`` sends the staged images
  of its request with the enqueue, in one pipeline (their ``SET``s, then the enqueue
  script; not as the script's arguments, which Redis copies). Before a worker sees a request the web
  side then makes three round trips: the API key's cache, the quota script, and this one
  (an answer-cache lookup adds one for deterministic requests). A staged image is kept
  until every request that staged it was submitted, or ``_STAGE_MAX_AGE_S`` passed (a
  request abandoned between validation and its stream).

Faults (docs/reliability.md):

- Connections recover by themselves: short socket and connect timeouts, a PING before
  reusing a connection idle longer than ``redis_health_check_s``, and retries with backoff
  on connection errors (never on timeouts). Every command may be repeated: reads, ``SET``,
  and the enqueue, whose script adds the entry only once per request id (a marker key
  ``{prefix}:submitted:{request_id}``), so a retry after a lost reply never runs a request
  twice. A broker outage raises ``redis.ConnectionError`` / ``redis.TimeoutError``.
- A request whose model has no live worker left while it waits ends with a retryable
  ``worker_lost`` error instead of waiting out the request timeout. A worker is live while
  its heartbeat key (renewed every ``heartbeat_s``, TTL ``heartbeat_ttl_s``) exists and its
  presence subscription is held (``inference.protocol.worker_liveness``). Every worker
  gone (a crash closes its connection, and Redis drops the subscription at once): given up
  once they stayed gone ``presence_grace_s`` (a live worker whose connection dropped
  subscribes again within a beat), well under a second after the crash. A worker still
  connected but silent (heartbeat expired: stuck, or late): given up once it stayed so for
  one more TTL. While another worker is live it waits: that
  worker takes a dead one's requests over.

Two ``redis.asyncio.Redis`` per event loop (a connection belongs to the loop that opened
it, and Django runs sync views' async calls in short-lived loops of their own): one for
commands, with the short socket timeout, and one for the blocking ``XREAD``, whose socket
timeout adds the longest block to it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

import msgspec
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript
from redis.typing import XReadResponse

from inference.client.base import InferenceClient, ModelHealth, model_health_from_heartbeats
from inference.client.blobs import blob_check_digest
from inference.client.held_images import HeldImages
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
    Liveness,
    WorkerHeartbeat,
    decode_event,
    decode_heartbeat,
    decode_heartbeat_presence,
    encode,
    worker_liveness,
)
from inference.settings import InferenceSettings

logger = logging.getLogger(__name__)

# Longest single XREAD block: short enough to notice the overall timeout, and a model left
# without a live worker, promptly.
_READ_BLOCK_MS = 250
# The first wait is shorter: a request queued to workers that just crashed (routing read
# their health before it) learns it a quarter second sooner; a live worker's first event
# usually ends that wait anyway.
_FIRST_READ_BLOCK_MS = 100
# How long the workers' states read for one waiting request serve the others of the process.
_LIVENESS_CACHE_S = 0.1
_READ_COUNT = 256
# Retries on connection errors: 20 ms, 40 ms... with jitter, at most 250 ms apart.
_RETRY_BASE_S = 0.02
_RETRY_CAP_S = 0.25

# Enqueue once per request id: KEYS[1] the model's request stream, KEYS[2] the request's
# marker; ARGV[1] the encoded request, ARGV[2] the marker's TTL (ms), ARGV[3] the field.
# The request's images are not arguments of the script: they go as plain SETs in the same
# pipeline, before it (``_enqueue``). A script copies every argument into Lua and back into
# a Redis value, ~2 ms for the 0.77 MB of a 520 px image's pixels, where a SET stores the
# bytes Redis read (``benchmarks/worker_hop.py``).
_SUBMIT_LUA = """
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[2]) then
  return redis.call('XADD', KEYS[1], '*', ARGV[3], ARGV[1])
end
return false
"""

# Each registered worker's heartbeat and presence, as the pairs ``beat (or false),
# subscribers`` after the reply's first ``n`` items; workers with neither (gone, or never
# seen) are dropped from the registry. KEYS[1] the worker registry; ARGV[1] the heartbeat
# keys' prefix and ARGV[2] the presence channels' prefix (``KeySpace.heartbeat`` /
# ``presence`` less the worker id; keys built in the script, so this needs a single Redis,
# not a cluster).
_WORKERS_LUA = """
local workers = {}
local gone = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local beat = redis.call('GET', ARGV[1] .. id)
  local subscribers = redis.call('PUBSUB', 'NUMSUB', ARGV[2] .. id)[2]
  if beat or subscribers > 0 then
    workers[#workers + 1] = beat
    workers[#workers + 1] = subscribers
  else
    gone[#gone + 1] = id
  end
end
if #gone > 0 then redis.call('ZREM', KEYS[1], unpack(gone)) end
"""

_LIVENESS_LUA = _WORKERS_LUA + "return workers\n"

# A model's health in one round trip: the workers as above, then KEYS[2] the request
# stream and ARGV[3] the consumer group. Returns ``{waiting, pending, beat, subscribers,
# ...}``.
_HEALTH_LUA = (
    _WORKERS_LUA
    + """
local waiting, pending = 0, 0
if redis.call('EXISTS', KEYS[2]) == 1 then
  waiting = redis.call('XLEN', KEYS[2])
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[2])) do
    local fields = {}
    for i = 1, #group, 2 do fields[group[i]] = group[i + 1] end
    if fields['name'] == ARGV[3] then
      pending = fields['pending']
      -- No lag when Redis cannot compute it (entries deleted past the group's position):
      -- finished entries are deleted, so the stream holds waiting + pending.
      if fields['lag'] then waiting = fields['lag'] else waiting = math.max(0, waiting - pending) end
    end
  end
end
local reply = {waiting, pending}
for _, item in ipairs(workers) do reply[#reply + 1] = item end
return reply
"""
)

# A staged image nobody submitted (its request was abandoned before its stream) is dropped
# after this long.
_STAGE_MAX_AGE_S = 60.0


@dataclass(frozen=True)
class _LoopClients:
    """The clients of one event loop."""

    commands: aioredis.Redis
    blocking: aioredis.Redis  # XREAD with BLOCK
    submit_script: AsyncScript
    health_script: AsyncScript
    liveness_script: AsyncScript


class RedisStreamsClient(InferenceClient):
    """``InferenceClient`` over Redis Streams. Safe to share across event loops."""

    def __init__(self, *, settings: InferenceSettings) -> None:
        if not settings.redis_url:
            raise ValueError("the Redis transport needs INFERENCE_REDIS_URL (or REDIS_URL)")
        self.settings = settings
        self.keys = KeySpace(settings.key_prefix)
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClients] = (
            weakref.WeakKeyDictionary()
        )
        # Images staged by put_image, by (tenant, sha256): sent with their request's enqueue.
        # A lock, not the event loop, guards it: the client serves several loops (threads).
        self._staged = HeldImages(max_age_s=_STAGE_MAX_AGE_S)
        # model -> (monotonic time it was read, its health / its workers' states)
        self._health: dict[str, tuple[float, ModelHealth]] = {}
        self._liveness_cache: dict[str, tuple[float, set[Liveness]]] = {}

    def _connect(self, *, socket_timeout_s: float) -> aioredis.Redis:
        s = self.settings
        return aioredis.Redis.from_url(
            s.redis_url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=s.redis_connect_timeout_s,
            health_check_interval=s.redis_health_check_s,
            retry=Retry(
                ExponentialWithJitterBackoff(cap=_RETRY_CAP_S, base=_RETRY_BASE_S),
                s.redis_retries,
                supported_errors=(redis.ConnectionError,),
            ),
        )

    def _loop_clients(self) -> _LoopClients:
        loop = asyncio.get_running_loop()
        clients = self._clients.get(loop)
        if clients is None:
            timeout = self.settings.redis_socket_timeout_s
            commands = self._connect(socket_timeout_s=timeout)
            clients = _LoopClients(
                commands=commands,
                blocking=self._connect(socket_timeout_s=timeout + _READ_BLOCK_MS / 1000),
                submit_script=commands.register_script(_SUBMIT_LUA),
                health_script=commands.register_script(_HEALTH_LUA),
                liveness_script=commands.register_script(_LIVENESS_LUA),
            )
            self._clients[loop] = clients
        return clients

    def _redis(self) -> aioredis.Redis:
        return self._loop_clients().commands

    async def put_image(self, *, tenant_id: str, data: bytes, ref: ImageRef) -> None:
        """Stage the image for its request's enqueue (no round trip of its own)."""
        blob_check_digest(data=data, ref=ref)
        self._staged.put(tenant_id=tenant_id, sha256=ref.sha256, data=data)

    def _unstage(self, request: InferenceRequest) -> tuple[list[str], list[bytes]]:
        """The blob keys and bytes of the request's staged images, released by it."""
        # An image not staged was stored by an earlier request (a conversation's earlier turn).
        staged = self._staged.take(
            tenant_id=request.tenant_id,
            sha256s=dict.fromkeys(ref.sha256 for ref in request.image_refs()),
        )
        keys = [self.keys.blob(request.tenant_id, sha256) for sha256 in staged]
        return keys, list(staged.values())

    async def submit(
        self, request: InferenceRequest, *, time_limit_s: float | None = None
    ) -> AsyncIterator[Event]:
        if self.settings.models and request.model not in self.settings.models:
            yield ErrorEvent(ErrorCode.MODEL_NOT_FOUND, f"Unknown model '{request.model}'.")
            return
        time_limit_s = time_limit_s or self.settings.request_timeout_s
        await self._enqueue(request, time_limit_s)
        finished = False
        try:
            async for event in self.events(
                request.request_id, time_limit_s=time_limit_s, model=request.model
            ):
                finished = isinstance(event, TERMINAL_EVENTS)
                yield event
        finally:
            if not finished:
                # The caller stopped listening (client gone) or we timed out: free the slot.
                await self._cancel_quietly(request.request_id)

    async def _enqueue(self, request: InferenceRequest, time_limit_s: float) -> None:
        """The request's staged images, then the request once per id, in one round trip.

        Each image is stored once per tenant and content (``SET NX``) and its TTL renewed,
        so a re-upload keeps it alive for the new request; the images come before the
        script in the pipeline, so Redis has them when a worker reads the entry. Every
        command may be repeated: a retry after a lost reply stores nothing twice and the
        script adds the entry only once (its marker)."""
        blob_keys, blobs = self._unstage(request)
        clients = self._loop_clients()
        ttl = self.settings.blob_ttl_s
        args: list[bytes | str | int] = [
            encode(request),
            int(time_limit_s * 1000) + 1,
            REQUEST_FIELD,
        ]
        keys = [self.keys.requests(request.model), self._submitted_key(request.request_id)]
        if not blob_keys:
            await clients.submit_script(keys=keys, args=args)
            return
        async with clients.commands.pipeline(transaction=False) as pipe:
            for key, blob in zip(blob_keys, blobs, strict=True):
                pipe.set(key, blob, nx=True, ex=ttl)
                pipe.expire(key, ttl)
            # EVAL, not the Script object: a Script in a pipeline makes redis-py check with
            # SCRIPT EXISTS first, a round trip more on every call. Redis caches the
            # compiled body by its digest; the ~150 bytes of text cost nothing here.
            pipe.eval(_SUBMIT_LUA, len(keys), *keys, *args)
            await pipe.execute()

    def _submitted_key(self, request_id: str) -> str:
        return f"{self.keys.prefix}:submitted:{request_id}"

    async def events(
        self,
        request_id: str,
        *,
        time_limit_s: float,
        after: str = "0-0",
        model: str | None = None,
    ) -> AsyncIterator[Event]:
        """Read a request's reply stream from ``after`` until its terminal event.

        Ends with ``ErrorEvent(TIMEOUT)`` if no terminal event arrives within ``time_limit_s``
        seconds; with a retryable ``ErrorEvent(WORKER_LOST)`` when ``model`` is given and a
        wait with nothing new finds none of its workers live. Does not cancel anything:
        ``submit`` does that.
        """
        key = self.keys.reply(request_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + time_limit_s
        last_id: bytes | str = after
        clients = self._loop_clients()
        client = clients.blocking
        # Since when a wait with nothing new found no live worker of ``model``. Workers all
        # gone (connections closed) are given up once they stay so ``presence_grace_s`` (a
        # live worker whose connection dropped subscribes again within a beat); a silent
        # one (connected, heartbeat expired) once it stays so one more TTL, so a worker whose
        # beat is late (a long step, a starved CPU) is not given up.
        none_live_since: float | None = None
        first = True
        while True:
            now = loop.time()
            remaining_ms = int((deadline - now) * 1000)
            if remaining_ms <= 0:
                yield ErrorEvent(
                    ErrorCode.TIMEOUT,
                    f"No answer within {time_limit_s:g} seconds.",
                    retryable=True,
                )
                return
            block_ms = min(remaining_ms, _FIRST_READ_BLOCK_MS if first else _READ_BLOCK_MS)
            first = False
            if none_live_since is not None:  # look again as soon as the grace is over
                grace_end = none_live_since + self.settings.presence_grace_s
                block_ms = max(1, min(block_ms, int((grace_end - now) * 1000) + 1))
            resp = await client.xread({key: last_id}, count=_READ_COUNT, block=block_ms)
            entries = _xread_entries(resp)
            if entries or model is None:
                none_live_since = None
            else:
                states = await self._liveness(clients, model)
                now = loop.time()
                if Liveness.LIVE in states:
                    none_live_since = None
                elif none_live_since is None:
                    none_live_since = now
                else:
                    grace = (
                        self.settings.heartbeat_ttl_s
                        if Liveness.SILENT in states
                        else self.settings.presence_grace_s
                    )
                    if now - none_live_since >= grace:
                        yield ErrorEvent(
                            ErrorCode.WORKER_LOST,
                            f"No worker of the model '{model}' is serving any more; retry shortly.",
                            retryable=True,
                        )
                        return
            for entry_id, fields in entries:
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
        now = time.monotonic()
        cached = self._health.get(model)
        if cached is not None and now - cached[0] < self.settings.health_cache_s:
            return cached[1]
        reply = await self._loop_clients().health_script(
            keys=[self.keys.registry(model), self.keys.requests(model)],
            args=[self.keys.heartbeat(model, ""), self.keys.presence(model, ""), GROUP],
        )
        waiting, pending, *items = cast("list[Any]", reply)
        workers = _workers(items)  # decoded once, for the health and the states alike
        health = model_health_from_heartbeats(
            model,
            [beat for beat, state in workers if state is Liveness.LIVE and beat],
            waiting=int(waiting),
            pending=int(pending),
        )
        self._health[model] = (now, health)
        self._liveness_cache[model] = (now, {state for _beat, state in workers})
        return health

    async def _liveness(self, clients: _LoopClients, model: str) -> set[Liveness]:
        """The states of ``model``'s registered workers, read at most every
        ``_LIVENESS_CACHE_S`` per process: every request waiting on the model shares it."""
        now = time.monotonic()
        cached = self._liveness_cache.get(model)
        if cached is not None and now - cached[0] < _LIVENESS_CACHE_S:
            return cached[1]
        reply = await clients.liveness_script(
            keys=[self.keys.registry(model)],
            args=[self.keys.heartbeat(model, ""), self.keys.presence(model, "")],
        )
        items = cast("list[Any]", reply)
        # Only the states: each beat's presence field alone, not the whole heartbeat.
        states = {
            worker_liveness(None if raw is None else decode_heartbeat_presence(_raw(raw)), int(n))
            for raw, n in zip(items[::2], items[1::2], strict=True)
        }
        self._liveness_cache[model] = (now, states)
        return states

    async def aclose(self) -> None:
        """Close the connection pools of the current loop (tests; shutdown)."""
        loop = asyncio.get_running_loop()
        clients = self._clients.pop(loop, None)
        if clients is not None:
            await clients.commands.aclose()
            await clients.blocking.aclose()


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


def _workers(items: list[Any]) -> list[tuple[WorkerHeartbeat | None, Liveness]]:
    """The ``beat, subscribers`` pairs of the workers scripts, decoded and judged."""
    judged: list[tuple[WorkerHeartbeat | None, Liveness]] = []
    for raw, subscribers in zip(items[::2], items[1::2], strict=True):
        beat = None if raw is None else decode_heartbeat(_raw(raw))
        judged.append((beat, worker_liveness(beat, int(subscribers))))
    return judged


def _text(value: object) -> str:
    """A reply's name (bytes under RESP2) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _raw(value: bytes | str) -> bytes:
    """A reply's value as bytes: it is bytes already, redis-py's ``str`` is for decoding
    clients."""
    return value if isinstance(value, bytes) else value.encode()
