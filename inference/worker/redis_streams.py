"""The worker half of the Redis Streams transport (synchronous: the worker loop is a thread).

Keys and entry fields are in ``inference.protocol`` (``KeySpace``) and DESIGN.md; the web
half is ``inference.client.redis_streams``. What this side adds:

- Requests are read with ``XREADGROUP`` into the consumer group ``workers``; the consumer
  name is the worker id. An entry is acknowledged (``XACK``) and deleted (``XDEL``, so the
  stream holds only unfinished work) in the same pipeline that writes its terminal event,
  after that event.
- A reply stream's TTL is set at its first write, refreshed every quarter of the reply TTL
  and set again with its terminal event, not at every token.
- Liveness: besides its heartbeat key, a worker holds a pub/sub subscription to its
  presence channel (``KeySpace.presence``) on a connection of its own. The kernel closes a
  killed process's sockets and Redis drops the subscription at once, so ``PUBSUB NUMSUB``
  tells a crash within milliseconds, where the heartbeat key lives on for its TTL; a stuck
  process (connected, no heartbeat) is told by the key's expiry
  (``inference.protocol.worker_liveness``).
- Reclaiming: a pending entry is taken over only when its consumer is not live: gone (its
  presence connection closed, and still so ``presence_grace_s`` later) or silent (its heartbeat key expired while still
  connected: once the entry was idle longer than the claim timeout). The liveness check
  matters: a long generation keeps its entry idle for minutes while its worker is healthy,
  and ``XAUTOCLAIM`` alone would hand it to a second worker. ``XCLAIM`` with a min-idle
  time makes concurrent claimers safe (the first resets the idle time, so the others skip
  the entry).
- The delivery count (``times_delivered`` from ``XPENDING``) tells poison requests apart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import msgspec
import redis
from redis.client import PubSub
from redis.typing import XClaimResponse, XReadGroupResponse

from inference.protocol import (
    EVENT_FIELD,
    GROUP,
    REQUEST_FIELD,
    TAKEN_OVER,
    TERMINAL_EVENTS,
    KeySpace,
    Liveness,
    NoticeEvent,
    StartEvent,
    WorkerHeartbeat,
    decode_event,
    decode_heartbeat_presence,
    decode_request,
    encode,
    encode_heartbeat,
    worker_liveness,
)
from inference.settings import InferenceSettings
from inference.worker.transport import (
    Delivery,
    Outgoing,
    ReplyState,
    TransportUnavailable,
)

logger = logging.getLogger(__name__)

_CLAIM_BATCH = 16
# A dead consumer with nothing pending is removed from the group after this long.
_FORGET_CONSUMER_AFTER_MS = 10 * 60 * 1000
_REGISTRY_TTL_S = 24 * 3600  # a model nobody serves any more leaves no registry behind
_TTL_MEMORY = 10_000
# The idle time a claim asks of a gone worker's entries: XCLAIM with a min-idle time is what
# keeps two workers claiming at once from both taking an entry (the first resets it).
_GONE_CLAIM_IDLE_MS = 100
# A reply holding this many entries has text in it: only a start and notices come before.
_REPLY_STATE_SCAN = 8  # replies whose TTL time is remembered before the old ones are dropped

_T = TypeVar("_T")


def _redis_call(fn: Callable[[], _T]) -> _T:
    try:
        return fn()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise TransportUnavailable(str(exc)) from exc


def ensure_group(client: redis.Redis, stream: str) -> None:
    """Create the consumer group (and the stream) if missing; idempotent.

    The group starts at id 0 so that requests enqueued before any worker existed are served.
    """
    try:
        client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class RedisWorkerTransport:
    """``WorkerTransport`` over Redis Streams for one model and one worker id."""

    supports_reclaim = True

    def __init__(
        self,
        *,
        client: redis.Redis,
        settings: InferenceSettings,
        model: str,
        worker_id: str,
    ) -> None:
        self._r = client
        self._settings = settings
        self._keys = KeySpace(settings.key_prefix)
        self._model = model
        self._worker_id = worker_id
        self._stream = self._keys.requests(model)
        self._ttl_set: dict[str, float] = {}  # reply key -> when publish last set its TTL
        self._presence_channel = self._keys.presence(model, worker_id)
        self._presence: PubSub | None = None  # held from the first heartbeat on
        self._gone_seen: dict[str, float] = {}  # consumer -> when a claim pass first saw it gone
        self._orphans: set[str] = set()  # entry ids claimed by a pass that did not return
        # How long a consumer stays gone before its requests are taken.
        self._claim_grace_s = settings.presence_grace_s

    @classmethod
    def from_url(
        cls, url: str, *, settings: InferenceSettings, model: str, worker_id: str
    ) -> RedisWorkerTransport:
        client = redis.Redis.from_url(url, health_check_interval=30)
        return cls(client=client, settings=settings, model=model, worker_id=worker_id)

    def setup(self) -> None:
        _redis_call(lambda: ensure_group(self._r, self._stream))

    def fetch(self, count: int, block_ms: int) -> list[Delivery]:
        # redis-py: block=0 would mean "forever"; None means "do not block".
        block = block_ms if block_ms > 0 else None

        def read() -> XReadGroupResponse:
            try:
                return self._r.xreadgroup(
                    GROUP, self._worker_id, {self._stream: ">"}, count=count, block=block
                )
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # The stream was deleted under us (an operator reset the queue): recreate.
                ensure_group(self._r, self._stream)
                return []

        resp = _redis_call(read)
        deliveries: list[Delivery] = []
        for entry_id, fields in _xreadgroup_entries(resp):
            delivery = self._delivery(entry_id, fields, attempt=1, state=ReplyState.EMPTY)
            if delivery is not None:
                deliveries.append(delivery)
        return deliveries

    def claim_stale(self, *, include_own: bool = False) -> list[Delivery]:
        return _redis_call(lambda: self._claim_stale(include_own))

    def _claim_stale(self, include_own: bool) -> list[Delivery]:
        try:
            consumers = self._r.xinfo_consumers(self._stream, GROUP)
        except redis.ResponseError:
            return []  # no stream or group yet
        others = [c for c in consumers if include_own or _text(c["name"]) != self._worker_id]
        if not others:
            return []
        names = [_text(c["name"]) for c in others]
        pipe = self._r.pipeline(transaction=False)
        for name in names:
            pipe.get(self._keys.heartbeat(self._model, name))
            pipe.pubsub_numsub(self._keys.presence(self._model, name))
        replies = pipe.execute()
        beats = [None if raw is None else decode_heartbeat_presence(raw) for raw in replies[::2]]
        states = [
            worker_liveness(beat, int(numsub[0][1]) if numsub else 0)
            for beat, numsub in zip(beats, replies[1::2], strict=True)
        ]
        now = time.monotonic()
        # When each gone consumer was first seen gone, over passes (every one, also those a
        # full batch leaves for the next pass).
        self._gone_seen = {
            name: self._gone_seen.get(name, now)
            for name, state in zip(names, states, strict=True)
            if state is Liveness.GONE and name != self._worker_id
        }
        claimed: list[Delivery] = self._retake_orphans()
        for consumer, name, state in zip(others, names, states, strict=True):
            own = name == self._worker_id
            if state is Liveness.LIVE and not own:
                continue
            gone_for = now - self._gone_seen.get(name, now)
            if state is Liveness.GONE and not own and gone_for < self._claim_grace_s:
                # Gone on this pass: claimed once still gone after the grace. A live worker
                # whose connections dropped (a network fault, a failover) subscribes again
                # at its next heartbeat once it reaches Redis.
                continue
            # A closed presence connection proves the process is gone: its requests are
            # taken at once (a short idle keeps concurrent claimers apart). Only a silent
            # worker (connected, no heartbeat: stuck, or late) waits out the claim timeout.
            min_idle = (
                self._settings.claim_idle_ms if state is Liveness.SILENT else _GONE_CLAIM_IDLE_MS
            )
            if consumer["pending"] == 0:
                if not own and consumer["idle"] > _FORGET_CONSUMER_AFTER_MS:
                    self._r.xgroup_delconsumer(self._stream, GROUP, name)
                continue
            pending = self._r.xpending_range(
                self._stream,
                GROUP,
                "-",
                "+",
                _CLAIM_BATCH,
                consumername=name,
                idle=None if own else min_idle,
            )
            if not pending:
                continue
            delivered = {_text(p["message_id"]): int(p["times_delivered"]) for p in pending}
            # Ours from the XCLAIM on: until this pass returns them, they are orphans that
            # the next pass takes again if this one fails half-way (no other worker would:
            # this one is live).
            self._orphans.update(delivered)
            entries = _xclaim_entries(
                self._r.xclaim(
                    self._stream, GROUP, self._worker_id, 0 if own else min_idle, list(delivered)
                )
            )
            claimed += self._claimed_deliveries(entries, delivered, source=name)
            if len(claimed) >= _CLAIM_BATCH:
                break
        self._tell_taken_over(claimed)
        self._orphans.clear()
        return claimed

    def _claimed_deliveries(
        self,
        entries: list[tuple[bytes, dict[bytes, bytes]]],
        delivered: dict[str, int],
        *,
        source: str,
    ) -> list[Delivery]:
        claimed = []
        for entry_id, fields in entries:
            eid = _text(entry_id)
            # XCLAIM counted this delivery too.
            attempt = delivered.get(eid, 1) + 1
            delivery = self._delivery(entry_id, fields, attempt=attempt, state=None)
            if delivery is not None:
                claimed.append(delivery)
                logger.warning(
                    "reclaimed %s from worker %s (delivery %d, reply %s)",
                    delivery.request.request_id,
                    source,
                    attempt,
                    delivery.reply_state.value,
                )
        return claimed

    def _retake_orphans(self) -> list[Delivery]:
        """What an earlier pass claimed but could not return (the broker failed half-way):
        still this worker's in the group, read again from the stream."""
        if not self._orphans:
            return []
        pending = self._r.xpending_range(
            self._stream,
            GROUP,
            "-",
            "+",
            len(self._orphans) + _CLAIM_BATCH,
            consumername=self._worker_id,
        )
        # The delivery count already has the claim that made it ours.
        delivered = {
            _text(p["message_id"]): int(p["times_delivered"]) - 1
            for p in pending
            if _text(p["message_id"]) in self._orphans
        }
        pipe = self._r.pipeline(transaction=False)
        for eid in delivered:
            pipe.xrange(self._stream, eid, eid)
        entries = [entry for found in pipe.execute() for entry in found]
        return self._claimed_deliveries(entries, delivered, source="an unfinished claim pass")

    def _tell_taken_over(self, claimed: list[Delivery]) -> None:
        """A streaming client of a request taken over has seen nothing yet (or only its
        start): tell it why it waits. One that had text ends with worker_lost instead. Best
        effort: a notice that cannot be written must not lose the claimed requests."""
        notices = [
            Outgoing(d.request.request_id, [NoticeEvent.fixed(TAKEN_OVER)])
            for d in claimed
            if d.request.stream
            and 1 < d.attempt <= self._settings.max_deliveries  # not one given up
            and d.reply_state in (ReplyState.EMPTY, ReplyState.STARTED)
        ]
        try:
            self.publish(notices)
        except TransportUnavailable:
            logger.warning("could not tell %d clients their request was taken over", len(notices))

    def _delivery(
        self, entry_id: bytes, fields: dict[bytes, bytes], *, attempt: int, state: ReplyState | None
    ) -> Delivery | None:
        eid = _text(entry_id)
        try:
            request = decode_request(fields[REQUEST_FIELD])
        except (KeyError, msgspec.DecodeError, msgspec.ValidationError):
            # Without a request id there is nobody to answer: drop it, loudly.
            logger.error("dropping undecodable request entry %s on %s", eid, self._stream)
            pipe = self._r.pipeline(transaction=False)
            pipe.xack(self._stream, GROUP, eid)
            pipe.xdel(self._stream, eid)
            pipe.execute()
            return None
        if state is None:
            state = self._reply_state(request.request_id)
        return Delivery(request=request, token=eid, attempt=attempt, reply_state=state)

    def _reply_state(self, request_id: str) -> ReplyState:
        """What the request's client was sent already: nothing (or only notices), its start,
        text, or everything."""
        key = self._keys.reply(request_id)
        pipe = self._r.pipeline(transaction=False)
        pipe.xrevrange(key, count=1)
        pipe.xrange(key, count=_REPLY_STATE_SCAN)
        last, first = pipe.execute()
        if not last:
            return ReplyState.EMPTY
        if isinstance(decode_event(last[0][1][EVENT_FIELD]), TERMINAL_EVENTS):
            return ReplyState.FINISHED
        events = [decode_event(fields[EVENT_FIELD]) for _id, fields in first]
        if len(events) == _REPLY_STATE_SCAN or any(
            not isinstance(e, StartEvent | NoticeEvent) for e in events
        ):
            return ReplyState.STREAMED  # text went out (a delta, even empty, counts as text)
        if any(isinstance(e, StartEvent) for e in events):
            return ReplyState.STARTED
        return ReplyState.EMPTY

    def fetch_images(self, tenant_id: str, sha256s: Sequence[str]) -> dict[str, bytes]:
        keys = [self._keys.blob(tenant_id, sha) for sha in sha256s]
        values = _redis_call(lambda: self._r.mget(keys))
        return {sha: _raw(v) for sha, v in zip(sha256s, values, strict=True) if v is not None}

    def cancelled(self, request_ids: Sequence[str]) -> set[str]:
        if not request_ids:
            return set()
        keys = [self._keys.cancel(rid) for rid in request_ids]
        values = _redis_call(lambda: self._r.mget(keys))
        return {rid for rid, v in zip(request_ids, values, strict=True) if v is not None}

    def publish(self, batch: Sequence[Outgoing]) -> None:
        if not batch:
            return
        s = self._settings
        pipe = self._r.pipeline(transaction=False)
        now = time.monotonic()
        # A reply's TTL is set at its first write, refreshed every quarter of it and set
        # again at its terminal event, not at every token: half the commands of a step.
        refresh_s = s.reply_ttl_s / 4
        expired: dict[str, float | None] = {}  # key -> when its TTL was set (None: finished)
        for out in batch:
            key = self._keys.reply(out.request_id)
            for event in out.events:
                pipe.xadd(
                    key, {EVENT_FIELD: encode(event)}, maxlen=s.reply_maxlen, approximate=True
                )
            if out.events:
                terminal = isinstance(out.events[-1], TERMINAL_EVENTS)
                last = expired[key] if key in expired else self._ttl_set.get(key)
                if terminal or last is None or now - last >= refresh_s:
                    expired[key] = None if terminal else now
            if out.ack_token is not None:
                # After the events, in the same pipeline: Redis runs them in order.
                pipe.xack(self._stream, GROUP, out.ack_token)
                pipe.xdel(self._stream, out.ack_token)
        for key in expired:
            pipe.expire(key, s.reply_ttl_s)
        _redis_call(pipe.execute)
        for key, at in expired.items():  # only once it is done: a retry sets them again
            if at is None:
                self._ttl_set.pop(key, None)
            else:
                self._ttl_set[key] = at
        if len(self._ttl_set) > _TTL_MEMORY:  # replies abandoned without a terminal event
            self._ttl_set = {k: t for k, t in self._ttl_set.items() if now - t < refresh_s}

    def heartbeat(self, beat: WorkerHeartbeat) -> None:
        """Write the heartbeat key (TTL ``heartbeat_ttl_s``) and the registry, and hold the
        presence subscription: subscribed before the first beat that declares it, checked
        (``PUBSUB NUMSUB``) with every beat and taken again at once if Redis lost it (a
        restart, a dropped connection)."""

        def run() -> None:
            if self._presence is None:
                self._subscribe_presence()
            subscribers = self._beat_pipeline(beat)
            if subscribers == 0:  # the subscription's connection was lost: take it again
                logger.warning("presence subscription lost; subscribing again")
                self._subscribe_presence()
                self._beat_pipeline(beat)

        _redis_call(run)

    def _beat_pipeline(self, beat: WorkerHeartbeat) -> int:
        registry = self._keys.registry(self._model)
        ttl_ms = int(self._settings.heartbeat_ttl_s * 1000)
        pipe = self._r.pipeline(transaction=False)
        pipe.set(
            self._keys.heartbeat(self._model, self._worker_id),
            encode_heartbeat(msgspec.structs.replace(beat, presence=True)),
            px=ttl_ms,
        )
        pipe.zadd(registry, {self._worker_id: time.time()})
        pipe.expire(registry, _REGISTRY_TTL_S)
        pipe.pubsub_numsub(self._presence_channel)
        *_, numsub = pipe.execute()
        return int(numsub[0][1]) if numsub else 0

    def _subscribe_presence(self) -> None:
        """A connection of its own, subscribed to this worker's presence channel; nothing is
        ever published there and nothing is read from it but the confirmation."""
        if self._presence is not None:
            self._presence.close()
            self._presence = None
        presence = PubSub(self._r.connection_pool)
        try:
            presence.subscribe(self._presence_channel)
            # SUBSCRIBE is confirmed by a message; wait for it, so NUMSUB counts us.
            deadline = time.monotonic() + max(self._settings.heartbeat_ttl_s, 1.0)
            while presence.get_message(timeout=0.1) is None:
                if time.monotonic() > deadline:
                    raise redis.TimeoutError("no confirmation of the presence subscription")
        except BaseException:
            presence.close()
            raise
        self._presence = presence

    def unregister(self) -> None:
        def run() -> None:
            pipe = self._r.pipeline(transaction=False)
            pipe.delete(self._keys.heartbeat(self._model, self._worker_id))
            pipe.zrem(self._keys.registry(self._model), self._worker_id)
            pipe.execute()
            own = self._r.xpending_range(
                self._stream, GROUP, "-", "+", 1, consumername=self._worker_id
            )
            if not own:  # deleting a consumer drops its pending entries: only when none
                self._r.xgroup_delconsumer(self._stream, GROUP, self._worker_id)
            self._close_presence()

        _redis_call(run)

    def _close_presence(self) -> None:
        if self._presence is not None:
            presence, self._presence = self._presence, None
            presence.close()

    def close(self) -> None:
        self._close_presence()
        self._r.close()


# Replies as this worker receives them. redis-py declares each reply for every protocol and
# decoding setting; this transport relies on redis-py's defaults, RESP2 and replies left as
# bytes (its URL sets neither ``protocol`` nor ``decode_responses``).


def _xreadgroup_entries(reply: XReadGroupResponse) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of an XREADGROUP ``>`` reply, in order: ``(id, {field: value})``, bytes.

    RESP2 answers a list of ``[stream, entries]`` pairs, the ``list[list[Any]]`` member of
    redis-py's ``XReadGroupResponse`` (its dict members are RESP3's); new entries (``>``) are
    never deleted ones, so none is ``(None, None)``.
    """
    pairs = cast("list[list[Any]]", reply)
    return [entry for _stream, entries in pairs or [] for entry in entries]


def _xclaim_entries(reply: XClaimResponse) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The claimed entries still in the stream, in order: ``(id, {field: value})``, bytes.

    Without ``justid`` the reply is redis-py's ``StreamRangeResponse`` member (the id-only
    list is JUSTID's): ``(id, fields)`` per entry, ``(None, None)`` for one deleted from the
    stream meanwhile (Redis before 7 still answers those).
    """
    claimed = cast("list[tuple[bytes, dict[bytes, bytes]] | tuple[None, None]]", reply)
    return [
        (entry_id, fields)
        for entry_id, fields in claimed
        if entry_id is not None and fields is not None
    ]


def _raw(value: bytes | str) -> bytes:
    """A reply's value as bytes: it is bytes already, redis-py's ``str`` is for decoding
    clients."""
    return value if isinstance(value, bytes) else value.encode()


def _text(value: object) -> str:
    """A reply's name or id (bytes) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)
