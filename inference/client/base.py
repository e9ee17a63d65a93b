"""What the web side needs from the inference service: ``InferenceClient``, one interface.

Two implementations, chosen by ``inference.client.factory`` from settings:
``inference.client.redis_streams`` (Redis Streams, separate worker processes) and
``inference.client.inprocess`` (embedded mode: the worker loop in a thread of this process).
This module imports neither.

Usage (from async code)::

    client = get_inference_client()
    await client.put_image(tenant_id=tenant_id, data=image_bytes, ref=image_ref)
    async for event in client.submit(request):
        ...  # StartEvent, DeltaEvent..., then exactly one DoneEvent or ErrorEvent

Leaving the ``async for`` early (the caller went away) cancels the request.
"""

from __future__ import annotations

import abc
import math
from collections.abc import AsyncIterator, Sequence

import msgspec

from inference.protocol import Event, ImageRef, InferenceRequest, WorkerHeartbeat
from inference.settings import InferenceSettings


class InferenceClient(abc.ABC):
    """What the web side needs from the inference service. All methods are coroutines."""

    settings: InferenceSettings

    @abc.abstractmethod
    async def put_image(self, *, tenant_id: str, data: bytes, ref: ImageRef) -> None:
        """Store validated image bytes under ``(tenant_id, ref.sha256)`` with the blob TTL.

        Idempotent: storing the same image again only refreshes its TTL. Raises
        ``inference.client.blobs.BlobDigestMismatch`` (a ``ValueError``) if ``data`` does not
        hash to ``ref.sha256``. Call before ``submit`` for every image the request refers to.
        """

    async def put_model_image(
        self, *, model: str, tenant_id: str, data: bytes, ref: ImageRef
    ) -> None:
        """``put_image`` for a request to ``model``: a client serving models several ways
        (``inference.client.dispatch.ModelDispatchClient``) stores it only where that model
        reads it."""
        await self.put_image(tenant_id=tenant_id, data=data, ref=ref)

    @abc.abstractmethod
    def submit(
        self, request: InferenceRequest, *, time_limit_s: float | None = None
    ) -> AsyncIterator[Event]:
        """Enqueue ``request`` and yield its events until the terminal one.

        Always ends with exactly one ``DoneEvent`` or ``ErrorEvent``: problems (unknown
        model, missing image, worker lost, no answer within ``time_limit_s`` seconds — default
        ``INFERENCE_REQUEST_TIMEOUT_SECONDS``) arrive as an ``ErrorEvent``, not an exception.
        Broker outages raise (``redis.RedisError``). If the caller stops iterating before
        the terminal event, the request is cancelled.
        """

    @abc.abstractmethod
    async def cancel(self, request_id: str) -> None:
        """Mark the request cancelled; its worker frees the slot at its next step and
        reports ``DoneEvent(CANCELLED)``. Harmless for unknown or finished requests."""

    @abc.abstractmethod
    async def model_health(self, model: str) -> ModelHealth:
        """Live workers, queue depth, running requests and capacity of ``model``."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, default does nothing
        """Release connections / stop workers of this client (tests, shutdown)."""


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
        tokens_per_second=math.fsum(b.tokens_per_second for b in beats),
        detail=detail,
        workers=tuple(beats),
    )
