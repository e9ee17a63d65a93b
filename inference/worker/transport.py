"""What the worker loop needs from a broker: the worker half of a transport.

Two implementations: ``inference.worker.redis_streams.RedisWorkerTransport`` (a worker
process on Redis Streams) and ``inference.client.inprocess.InProcessWorkerTransport`` (the
embedded mode, where the web process runs the loop in a thread). ``Worker``
(``inference.worker.loop``) drives either: take requests, fetch blobs, publish events and
acknowledge, check cancels, heartbeat, reclaim the requests of dead workers.

Nothing here imports Redis or Django.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from inference.protocol import Event, InferenceRequest, WorkerHeartbeat


class TransportUnavailable(Exception):
    """The broker cannot be reached right now; the caller should back off and retry."""


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
