"""The in-process transport (embedded mode: no Redis): the worker loop in a thread.

The broker is an ``InProcessHub``: per-model thread-safe request queues, a blob store with a
TTL, cancel marks, and one subscriber per request (its event loop and ``asyncio.Queue``).
The worker thread runs the very same ``inference.worker.loop.Worker`` as a Redis worker
process, with ``InProcessWorkerTransport`` (this module's worker half) in place of Redis;
events reach asyncio callers through ``loop.call_soon_threadsafe``.

A model's engine is loaded lazily, in its worker thread, on the first request for it; until
then ``model_health`` reports the model as servable (one worker that loads on demand) so
that readiness and admission do not refuse the very request that would load it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from inference.allocator import freeze_loaded_objects, keep_freed_memory
from inference.client.base import InferenceClient, ModelHealth, model_health_from_heartbeats
from inference.client.blobs import LocalBlobStore, blob_check_digest
from inference.protocol import (
    TERMINAL_EVENTS,
    ErrorCode,
    ErrorEvent,
    Event,
    ImageRef,
    InferenceRequest,
    WorkerHeartbeat,
)
from inference.settings import InferenceSettings
from inference.worker.loop import EngineLike, Worker, WorkerConfig
from inference.worker.transport import Delivery, Outgoing

logger = logging.getLogger(__name__)

EngineFactory = Callable[[str, Mapping[str, Any]], EngineLike]
# Batch slots reported before the engine has loaded and said how many it has.
_NOMINAL_CAPACITY = 8


def load_engine(model: str, spec: Mapping[str, Any]) -> EngineLike:
    """The default engine factory: the real engine from an ``INFERENCE_MODELS`` spec, in a
    process whose allocator keeps freed memory and whose loaded objects are frozen, as a
    worker's are (``inference.allocator``)."""
    from inference.worker.engines import engine_for_spec

    keep_freed_memory()
    engine = engine_for_spec(spec)
    freeze_loaded_objects()
    return engine


@dataclass
class _Subscriber:
    model: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Event]


class InProcessHub:
    """The meeting point of asyncio callers and worker threads. All methods thread-safe."""

    def __init__(self, *, blob_ttl_s: float, cancel_ttl_s: float) -> None:
        self.blobs = LocalBlobStore(ttl_s=blob_ttl_s)
        self._cancel_ttl_s = cancel_ttl_s
        self._lock = threading.Lock()
        self._queues: dict[str, queue.Queue[InferenceRequest]] = {}
        self._subscribers: dict[str, _Subscriber] = {}
        self._cancelled: dict[str, float] = {}  # request id -> expiry (monotonic)
        self._heartbeats: dict[str, WorkerHeartbeat] = {}

    def requests(self, model: str) -> queue.Queue[InferenceRequest]:
        with self._lock:
            return self._queues.setdefault(model, queue.Queue())

    def subscribe(self, request_id: str, subscriber: _Subscriber) -> None:
        with self._lock:
            self._subscribers[request_id] = subscriber

    def unsubscribe(self, request_id: str) -> None:
        with self._lock:
            self._subscribers.pop(request_id, None)

    def subscribers_of(self, model: str) -> int:
        with self._lock:
            return sum(1 for s in self._subscribers.values() if s.model == model)

    def deliver(self, request_id: str, events: Sequence[Event]) -> None:
        with self._lock:
            sub = self._subscribers.get(request_id)
            if sub is not None and any(isinstance(e, TERMINAL_EVENTS) for e in events):
                del self._subscribers[request_id]
        if sub is None or not events:
            return  # nobody listens any more (caller gone): drop, like an expired reply
        try:
            for event in events:
                sub.loop.call_soon_threadsafe(sub.queue.put_nowait, event)
        except RuntimeError:  # the caller's loop is closed
            self.unsubscribe(request_id)

    def fail_model(self, model: str, event: ErrorEvent) -> None:
        """Answer every waiting caller of ``model`` with ``event`` (its worker died)."""
        with self._lock:
            ids = [rid for rid, s in self._subscribers.items() if s.model == model]
        for rid in ids:
            self.deliver(rid, [event])
        q = self.requests(model)
        while True:
            try:
                q.get_nowait()
            except queue.Empty:
                break

    def cancel(self, request_id: str) -> None:
        now = time.monotonic()
        with self._lock:
            for rid in [r for r, exp in self._cancelled.items() if exp <= now]:
                del self._cancelled[rid]
            self._cancelled[request_id] = now + self._cancel_ttl_s

    def cancelled(self, request_ids: Sequence[str]) -> set[str]:
        now = time.monotonic()
        with self._lock:
            return {r for r in request_ids if self._cancelled.get(r, 0.0) > now}

    def set_heartbeat(self, model: str, beat: WorkerHeartbeat | None) -> None:
        with self._lock:
            if beat is None:
                self._heartbeats.pop(model, None)
            else:
                self._heartbeats[model] = beat

    def heartbeat(self, model: str) -> WorkerHeartbeat | None:
        with self._lock:
            return self._heartbeats.get(model)


class InProcessWorkerTransport:
    """``WorkerTransport`` over an ``InProcessHub`` for one model."""

    # Nothing outlives the process, so there is nobody to hand unfinished work to.
    supports_reclaim = False

    def __init__(self, *, hub: InProcessHub, model: str) -> None:
        self._hub = hub
        self._model = model
        self._queue = hub.requests(model)

    def setup(self) -> None:
        pass

    def fetch(self, count: int, block_ms: int) -> list[Delivery]:
        requests: list[InferenceRequest] = []
        try:
            if block_ms > 0:
                requests.append(self._queue.get(timeout=block_ms / 1000))
            while len(requests) < count:
                requests.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        return [Delivery(request=r, token=r.request_id) for r in requests]

    def claim_stale(self, *, include_own: bool = False) -> list[Delivery]:
        return []

    def fetch_images(self, tenant_id: str, sha256s: Sequence[str]) -> dict[str, bytes]:
        return self._hub.blobs.get_many(tenant_id=tenant_id, sha256s=sha256s)

    def cancelled(self, request_ids: Sequence[str]) -> set[str]:
        return self._hub.cancelled(request_ids)

    def publish(self, batch: Sequence[Outgoing]) -> None:
        for out in batch:
            self._hub.deliver(out.request_id, out.events)

    def heartbeat(self, beat: WorkerHeartbeat) -> None:
        self._hub.set_heartbeat(self._model, beat)

    def unregister(self) -> None:
        self._hub.set_heartbeat(self._model, None)


class _WorkerThread(threading.Thread):
    """Loads one model's engine, then runs ``Worker`` until stopped."""

    def __init__(
        self, *, hub: InProcessHub, model: str, settings: InferenceSettings, factory: EngineFactory
    ) -> None:
        super().__init__(name=f"inference-worker-{model}", daemon=True)
        self.hub = hub
        self.model = model
        self.settings = settings
        self.factory = factory
        self.stop_event = threading.Event()
        # Set when loading or serving failed for good: what its callers get from then on (the
        # exception itself is in the log).
        self.error: ErrorEvent | None = None

    def run(self) -> None:
        try:
            logger.info("loading model %s in-process", self.model)
            engine = self.factory(self.model, self.settings.models[self.model])
            config = WorkerConfig(
                model=self.model,
                worker_id=f"inprocess-{os.getpid()}-{self.model}",
                heartbeat_s=self.settings.heartbeat_s,
                max_deliveries=self.settings.max_deliveries,
                drain_timeout_s=5.0,
                max_request_age_s=self.settings.request_timeout_s,
            )
            transport = InProcessWorkerTransport(hub=self.hub, model=self.model)
            Worker(engine=engine, transport=transport, config=config).run(self.stop_event)
        except Exception:
            logger.exception("in-process worker for %s failed", self.model)
            self.error = ErrorEvent.fixed(ErrorCode.INTERNAL_ERROR)
            self.hub.fail_model(self.model, self.error)


class InProcessClient(InferenceClient):
    """``InferenceClient`` for the embedded mode: engines run in threads of this process."""

    def __init__(
        self, *, settings: InferenceSettings, engine_factory: EngineFactory | None = None
    ) -> None:
        self.settings = settings
        self.hub = InProcessHub(
            blob_ttl_s=settings.blob_ttl_s,
            cancel_ttl_s=max(settings.reply_ttl_s, settings.request_timeout_s),
        )
        self._factory = engine_factory or load_engine
        self._lock = threading.Lock()
        self._workers: dict[str, _WorkerThread] = {}

    def _worker(self, model: str) -> _WorkerThread:
        """The model's worker thread, started on first use."""
        with self._lock:
            worker = self._workers.get(model)
            if worker is None:
                worker = _WorkerThread(
                    hub=self.hub, model=model, settings=self.settings, factory=self._factory
                )
                worker.start()
                self._workers[model] = worker
            return worker

    def start(self, models: Sequence[str] | None = None) -> None:
        """Start (and so load) the models' workers now rather than on their first request."""
        for model in models if models is not None else list(self.settings.models):
            self._worker(model)

    async def put_image(self, *, tenant_id: str, data: bytes, ref: ImageRef) -> None:
        blob_check_digest(data=data, ref=ref)
        self.hub.blobs.put(tenant_id=tenant_id, sha256=ref.sha256, data=data)

    async def submit(
        self, request: InferenceRequest, *, time_limit_s: float | None = None
    ) -> AsyncIterator[Event]:
        if request.model not in self.settings.models:
            yield ErrorEvent(ErrorCode.MODEL_NOT_FOUND, f"Unknown model '{request.model}'.")
            return
        worker = self._worker(request.model)
        if worker.error is not None:
            yield worker.error
            return
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        rid = request.request_id
        self.hub.subscribe(rid, _Subscriber(model=request.model, loop=loop, queue=events))
        limit_s = time_limit_s or self.settings.request_timeout_s
        deadline = loop.time() + limit_s
        finished = False
        try:
            self.hub.requests(request.model).put(request)
            if worker.error is not None:  # it failed while we enqueued
                yield worker.error
                return
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    message = f"No answer within {limit_s:g} seconds."
                    yield ErrorEvent(ErrorCode.TIMEOUT, message, retryable=True)
                    return
                try:
                    event = await asyncio.wait_for(events.get(), remaining)
                except TimeoutError:
                    continue
                finished = isinstance(event, TERMINAL_EVENTS)
                yield event
                if finished:
                    return
        finally:
            self.hub.unsubscribe(rid)
            if not finished:  # caller gone or timed out: free the slot
                self.hub.cancel(rid)

    async def cancel(self, request_id: str) -> None:
        self.hub.cancel(request_id)

    async def model_health(self, model: str) -> ModelHealth:
        waiting = self.hub.requests(model).qsize()
        if model not in self.settings.models:
            return ModelHealth(model, 0, waiting, 0, 0, 0, detail="unknown model")
        with self._lock:
            worker = self._workers.get(model)
        if worker is not None and (worker.error is not None or not worker.is_alive()):
            detail = "worker failed (see the log)" if worker.error else "worker stopped"
            return ModelHealth(model, 0, waiting, 0, 0, 0, detail=detail)
        pending = max(0, self.hub.subscribers_of(model) - waiting)
        beat = self.hub.heartbeat(model)
        if beat is None:
            detail = "loads on first request" if worker is None else "loading"
            return ModelHealth(model, 1, waiting, pending, 0, _NOMINAL_CAPACITY, detail=detail)
        return model_health_from_heartbeats(model, [beat], waiting=waiting, pending=pending)

    def stop_workers(self, timeout: float = 10.0) -> None:
        """Stop every worker thread (drains running requests first, bounded)."""
        with self._lock:
            workers, self._workers = list(self._workers.values()), {}
        for worker in workers:
            worker.stop_event.set()
        for worker in workers:
            worker.join(timeout)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.stop_workers)
