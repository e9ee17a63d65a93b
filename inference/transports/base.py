"""What the worker loop and the web-side client need from a transport, and shared types.

A transport has two halves that meet in a broker (Redis, or a process-local hub):

- the web side, an ``InferenceClient`` (``inference/client.py``), enqueues requests, stores
  image blobs, reads events and marks cancels;
- the worker side, a ``WorkerTransport`` (this module), is what ``inference.worker.Worker``
  drives: take requests, fetch blobs, publish events and acknowledge, check cancels,
  heartbeat, reclaim the requests of dead workers.

Nothing here imports Django or Redis, so the worker loop and the in-process transport stay
free of both; settings are passed in as an ``InferenceSettings`` value.
"""

from __future__ import annotations

import enum
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from inference.protocol import Event, InferenceRequest, WorkerHeartbeat

GROUP = "workers"  # the one consumer group every worker of a model joins


class TransportUnavailable(Exception):
    """The broker cannot be reached right now; the caller should back off and retry."""


@dataclass(frozen=True)
class InferenceSettings:
    """Everything the transports read from Django settings, as plain data.

    Built once per process by ``inference.client.inference_settings()``.
    """

    transport: str = "inprocess"
    redis_url: str = ""
    key_prefix: str = "inference"
    models: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    blob_ttl_s: int = 900
    reply_ttl_s: int = 300
    claim_idle_ms: int = 15_000
    heartbeat_s: float = 2.0
    # The client gives up on a request after this long and reports TIMEOUT.
    request_timeout_s: float = 600.0
    # A request delivered this many times without finishing is a poison request.
    max_deliveries: int = 3
    # Cap on entries per reply stream (approximate trim); a reply longer than this loses
    # its oldest entries for a reader that joins very late.
    reply_maxlen: int = 10_000

    @property
    def heartbeat_ttl_s(self) -> float:
        # Three missed beats before a worker counts as dead.
        return max(3 * self.heartbeat_s, 1.0)


@dataclass(frozen=True)
class KeySpace:
    """Redis key names of the queue protocol (see DESIGN.md "Internal queue protocol")."""

    prefix: str = "inference"

    def requests(self, model: str) -> str:
        return f"{self.prefix}:{model}:requests"

    def reply(self, request_id: str) -> str:
        return f"{self.prefix}:reply:{request_id}"

    def cancel(self, request_id: str) -> str:
        return f"{self.prefix}:cancel:{request_id}"

    def blob(self, tenant_id: str, sha256: str) -> str:
        return f"{self.prefix}:blob:{tenant_id}:{sha256}"

    def heartbeat(self, model: str, worker_id: str) -> str:
        return f"{self.prefix}:{model}:worker:{worker_id}"

    def registry(self, model: str) -> str:
        """ZSET of the model's worker ids scored by last heartbeat (unix seconds)."""
        return f"{self.prefix}:{model}:workers"


class ReplyState(enum.Enum):
    """What a reclaimed request had already written to its reply stream."""

    EMPTY = "empty"  # nothing: re-run transparently
    STARTED = "started"  # only a StartEvent: re-run, but do not send a second StartEvent
    STREAMED = "streamed"  # answer text went out: cannot re-run without duplicating it
    FINISHED = "finished"  # a terminal event is there: only the acknowledgement was lost


@dataclass(frozen=True)
class Delivery:
    """One request handed to a worker. ``token`` identifies it to ``ack`` (a stream id)."""

    request: InferenceRequest
    token: str
    attempt: int = 1  # 1 for a first delivery; >1 when reclaimed from a dead worker
    reply_state: ReplyState = ReplyState.EMPTY


@dataclass
class Outgoing:
    """Events to append to one request's reply, then optionally acknowledge its delivery.

    Invariant: the acknowledgement is applied after the events are written, so a crash in
    between leaves a terminal event that a reclaiming worker sees (``ReplyState.FINISHED``).
    """

    request_id: str
    events: list[Event]
    ack_token: str | None = None


class WorkerTransport(Protocol):
    """The worker-side half of a transport. Methods are synchronous and called from the
    worker's one thread; they raise ``TransportUnavailable`` when the broker is down."""

    #: Whether undelivered work survives this worker (another worker may reclaim it).
    supports_reclaim: bool

    def setup(self) -> None: ...

    def fetch(self, count: int, block_ms: int) -> list[Delivery]:
        """Up to ``count`` new requests; waits up to ``block_ms`` when none (0: no wait)."""
        ...

    def claim_stale(self, *, include_own: bool = False) -> list[Delivery]:
        """Requests of dead workers that waited longer than the claim timeout."""
        ...

    def fetch_images(self, tenant_id: str, sha256s: Sequence[str]) -> dict[str, bytes]:
        """The stored blobs that still exist (missing ones are left out)."""
        ...

    def cancelled(self, request_ids: Sequence[str]) -> set[str]: ...

    def publish(self, batch: Sequence[Outgoing]) -> None: ...

    def heartbeat(self, beat: WorkerHeartbeat) -> None: ...

    def unregister(self) -> None:
        """Remove this worker's heartbeat on a clean stop."""
        ...


class ModelHealth(msgspec.Struct, frozen=True):
    """Liveness and load of one served model, for admission, degradation and readiness.

    ``queue_depth`` counts requests not yet running anywhere (still in the queue plus those
    waiting inside a worker's engine); ``capacity`` is the total batch slots of live workers.
    """

    model: str
    live_workers: int
    waiting: int  # in the queue, not yet taken by any worker
    pending: int  # taken by a worker and not finished (includes ones awaiting reclaim)
    running: int  # in a decode batch, summed over live workers
    capacity: int
    engine_waiting: int = 0  # taken by a worker, waiting in its engine for a slot
    tokens_per_second: float = 0.0
    detail: str = ""
    workers: tuple[WorkerHeartbeat, ...] = ()

    @property
    def queue_depth(self) -> int:
        return self.waiting + self.engine_waiting

    @property
    def free_slots(self) -> int:
        return max(0, self.capacity - self.running - self.engine_waiting)

    @property
    def available(self) -> bool:
        return self.live_workers > 0


def model_health_from_heartbeats(
    model: str,
    beats: Sequence[WorkerHeartbeat],
    *,
    waiting: int,
    pending: int,
    detail: str = "",
) -> ModelHealth:
    """Aggregate live workers' heartbeats with the queue's counters."""
    return ModelHealth(
        model=model,
        live_workers=len(beats),
        waiting=waiting,
        pending=pending,
        running=sum(b.running for b in beats),
        capacity=sum(b.max_batch_size for b in beats),
        engine_waiting=sum(b.waiting for b in beats),
        tokens_per_second=statistics.fsum(b.tokens_per_second for b in beats),
        detail=detail,
        workers=tuple(beats),
    )
