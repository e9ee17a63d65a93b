"""The worker loop: one engine, its broker IO beside it, the same code for both transports.

Two threads by default (``WorkerConfig.io_thread``). ``WorkerIO`` (``inference.worker.io``)
makes every broker call on its own thread: it takes new requests (as many as there are free
batch slots; reclaims dead workers' ones when due), reads their images and cancel marks,
reads the running requests' cancel marks, sends heartbeats and publishes events, one
``publish`` (one Redis pipeline) for whatever was handed to it since the last one. The
thread that runs ``Worker.run`` drives the engine and makes no broker call; each iteration:

1. heartbeat when due (built here from ``engine.stats()``, sent by the IO thread);
2. take what the IO thread handed over: admit new requests (``engine.add_request``), abort
   the running ones whose cancel mark it saw (the engine frees their slot in the next step);
3. ``engine.step()`` (only while at most ``max_unpublished_steps`` hand-overs wait to be
   published: when the broker is down the engine stops, as it did when this was one
   thread), route its events and hand them over; when the engine has nothing to do, wait
   for the IO thread's hand-over instead.

``Worker.run_once`` is one synchronous iteration of both (IO, step, publish) on the
caller's thread: the path the tests drive step by step, and with ``io_thread=False`` the
loop ``run`` runs (one thread, IO between the steps, as before).

Invariants:

- every delivery taken is acknowledged exactly once, after its terminal event is written;
- a non-streamed request (``stream=False``) writes nothing until it is finished, so a
  re-run after a crash is invisible; a streamed one that already sent text is never re-run;
- anything that goes wrong for one request becomes an ``ErrorEvent`` for that request,
  with its code's fixed message when the failure is ours (``inference.protocol``'s error
  policy: exception text goes to the log only); the loop keeps going. Only repeated
  whole-step failures end the process (a supervisor restarts it and its requests are
  reclaimed), because by then the engine is not trusted; so does a failure of the IO
  thread other than the broker being unreachable.

Stopping (SIGTERM): take no new requests, finish everything already taken, then return;
after ``drain_timeout_s`` what is left is abandoned: reclaimable requests that sent nothing
are left for another worker, the others get an ``ErrorEvent(WORKER_LOST)``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from inference.engine.config import EngineStats
from inference.protocol import (
    ERROR_MESSAGES,
    SERVER_ERRORS,
    TERMINAL_EVENTS,
    DeltaEvent,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    Event,
    FinishReason,
    InferenceRequest,
    StartEvent,
    Usage,
    WorkerHeartbeat,
)
from inference.worker.io import Arrival, WorkerIO
from inference.worker.observer import LoopObserver
from inference.worker.transport import (
    Delivery,
    Outgoing,
    ReplyState,
    TransportUnavailable,
    WorkerTransport,
)

logger = logging.getLogger("inference.worker")


class EngineLike(Protocol):
    """The part of ``inference.engine.Engine`` the worker uses (see that module)."""

    def add_request(self, request: InferenceRequest, images: Mapping[str, bytes]) -> None: ...
    def abort(self, request_id: str) -> None: ...
    def step(self) -> list[tuple[str, Event]]: ...
    def has_unfinished(self) -> bool: ...
    def stats(self) -> EngineStats: ...


def default_worker_id() -> str:
    """Unique per process start, so a restarted worker never inherits a dead one's name."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class WorkerConfig:
    model: str
    worker_id: str = field(default_factory=default_worker_id)
    max_batch_size: int | None = None  # None: the engine's own limit
    # Requests taken beyond the batch: the engine prepares them (images decoded and
    # resized, AdmissionQueue's preprocess_ahead) while the batch runs, so a slot that
    # frees finds its next request ready instead of waiting for a fetch, the image's read
    # and its preprocessing (+5 to +9 % requests/s at 16 and 64 clients on the CPU
    # benchmark, docs/benchmarks.md "Worker prefetch"). Held by this worker until it
    # finishes them (or dies: then claimed as the rest), so more of them takes work from
    # other workers.
    prefetch: int = 4
    heartbeat_s: float = 2.0
    claim_interval_s: float = 2.0
    idle_block_ms: int = 200
    max_deliveries: int = 3
    drain_timeout_s: float = 30.0
    # Requests queued longer than this are answered TIMEOUT, not run: their client has
    # given up (INFERENCE_REQUEST_TIMEOUT_SECONDS), so the work would be for nobody.
    max_request_age_s: float | None = None
    # Consecutive failed engine steps after which the engine is not trusted any more.
    max_step_failures: int = 5
    # The broker IO on its own thread (False: between the steps, on the engine's thread).
    io_thread: bool = True
    # How often the IO thread reads cancel marks and new requests while requests run but
    # the engine hands it nothing (a long step); otherwise it does at every hand-over.
    io_poll_ms: int = 10
    # The engine does not step while more hand-overs than this wait to be published.
    max_unpublished_steps: int = 4


@dataclass
class _InFlight:
    delivery: Delivery
    skip_start: bool = False  # a reclaimed request whose StartEvent is already out
    sent_text: bool = False
    buffered: list[Event] = field(default_factory=list)  # stream=False: held until the end


class Worker:
    """Serves one model's engine through one transport.

    ``run`` uses two threads (the caller's drives the engine, ``WorkerIO``'s makes the
    broker calls); ``run_once`` is one synchronous iteration on the caller's thread. Use
    one or the other, from one thread.
    """

    def __init__(
        self,
        *,
        engine: EngineLike,
        transport: WorkerTransport,
        config: WorkerConfig,
        observer: LoopObserver | None = None,
    ) -> None:
        self.engine = engine
        self.observer = observer or LoopObserver()  # metrics (inference.worker.metrics)
        self.transport = transport
        self.config = config
        self.max_batch_size = config.max_batch_size or int(engine.stats().max_batch_size)
        self.io = WorkerIO(
            transport=transport,
            max_batch_size=self.max_batch_size,
            prefetch=config.prefetch,
            claim_interval_s=config.claim_interval_s,
            idle_block_ms=config.idle_block_ms,
            poll_s=config.io_poll_ms / 1000,
            renew_heartbeat_s=config.heartbeat_s,
        )
        self._inflight: dict[str, _InFlight] = {}
        self._abort_sent: set[str] = set()
        self._outbox: list[Outgoing] = []  # routed this iteration, not yet handed over
        self._started_at = time.time()
        self._next_heartbeat = 0.0
        self._step_failures = 0

    # --- lifecycle ------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set, then drain (bounded) and unregister."""
        cfg = self.config
        logger.info(
            "worker start model=%s worker_id=%s max_batch_size=%d io_thread=%s",
            cfg.model,
            cfg.worker_id,
            self.max_batch_size,
            cfg.io_thread,
        )
        if cfg.io_thread:
            self._run_threaded(stop)
        else:
            self._run_inline(stop)

    def _run_threaded(self, stop: threading.Event) -> None:
        self.io.start(stop)
        ready = False
        try:
            ready = self.io.wait_ready(stop)
            if ready:
                self._serve(stop, threaded=True)
        except BaseException:
            self.io.close(unregister=False)  # publishes what was handed over, if it can
            raise
        self.io.close(unregister=ready)
        if ready:
            self._stopped()

    def _run_inline(self, stop: threading.Event) -> None:
        if not self.io.prepare(stop):
            return
        self._serve(stop, threaded=False)
        try:
            self.transport.unregister()
        except TransportUnavailable:
            logger.warning("could not unregister worker %s", self.config.worker_id)
        self._stopped()

    def _serve(self, stop: threading.Event, *, threaded: bool) -> None:
        cfg = self.config
        if threaded:  # registered (first heartbeat in the broker) before it says ready
            self._heartbeat_if_due()
            self.io.wait_heartbeat_sent(timeout_s=2.0)
        logger.info("worker ready model=%s worker_id=%s", cfg.model, cfg.worker_id)
        self.observer.ready()
        drain_deadline: float | None = None
        while True:
            if stop.is_set() and drain_deadline is None:
                drain_deadline = time.monotonic() + cfg.drain_timeout_s
                self.io.stop_accepting()
                self.observer.draining()
                logger.info(
                    "worker stopping worker_id=%s in_flight=%d", cfg.worker_id, len(self._inflight)
                )
            if drain_deadline is not None:
                if not self._inflight and not self._outbox and self.io.settled():
                    break
                if time.monotonic() > drain_deadline:
                    self._abandon_all()
                    break
            if threaded:
                self.io.check()
                self._heartbeat_if_due()
                self.step_once(wait_s=self._idle_wait_s(), max_lag=cfg.max_unpublished_steps)
                continue
            try:
                self.run_once(accept_new=drain_deadline is None)
            except TransportUnavailable as exc:
                logger.warning("broker unavailable, backing off: %s", exc)
                time.sleep(0.5)

    def _stopped(self) -> None:
        logger.info("worker stop model=%s worker_id=%s", self.config.model, self.config.worker_id)
        self.observer.stopped()

    def run_once(self, *, accept_new: bool = True) -> None:
        """One synchronous iteration on this thread: heartbeat when due; publish what is
        left, take new requests and cancel marks (``WorkerIO.io_once``); admit, abort, step
        (``step_once``); publish the step's events. Raises ``TransportUnavailable``."""
        self._heartbeat_if_due()
        self.io.io_once(accept_new=accept_new)
        self.step_once()
        self.io.publish_pending()

    def step_once(self, *, wait_s: float = 0.0, max_lag: int | None = None) -> bool:
        """The engine's side of one iteration, without a broker call: admit what the IO
        handed over, abort the cancelled, step (only while at most ``max_lag`` hand-overs
        are unpublished, when given), hand the events over. When the engine has nothing to
        do, waits up to ``wait_s`` for the IO's hand-over first. True when it stepped."""
        idle = not self._inflight and not self.engine.has_unfinished()
        admissions, cancels = self.io.take(wait_s if idle else 0.0)
        self._admit_all(admissions)
        self._apply_cancels(cancels)
        stepped = False
        if self.engine.has_unfinished():
            # Bounded, so that a broker outage during a drain still lets the loop see its
            # deadline; the engine does not step ahead of what clients were sent.
            if max_lag is None or self.io.wait_published(max_lag, timeout_s=0.1):
                self._step()
                stepped = True
        self._hand_over()
        return stepped

    def _idle_wait_s(self) -> float:
        """How long an idle engine thread waits for the IO thread: until the next heartbeat
        is due, and short enough to see a stop soon."""
        return max(0.0, min(0.05, self._next_heartbeat - time.monotonic()))

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    # --- admission ------------------------------------------------------------------

    def _admit_all(self, admissions: list[Arrival]) -> None:
        """Admit (or answer at once) every delivery the IO handed over."""
        for admission in admissions:
            delivery = admission.delivery
            try:
                self._admit(admission)
            except Exception as exc:  # one request's problem, not the worker's
                logger.exception("admitting %s failed", delivery.request.request_id)
                self._finish_early(delivery, ErrorEvent.fixed(_error_code_for(exc)))

    def _admit(self, admission: Arrival) -> None:
        delivery = admission.delivery
        request = delivery.request
        rid = request.request_id
        if rid in self._inflight:
            # The same request delivered twice to us (it was re-queued): serve it once.
            logger.warning("duplicate delivery of %s acknowledged", rid)
            self._outbox.append(Outgoing(rid, [], ack_token=delivery.token))
            return
        if delivery.reply_state is ReplyState.FINISHED:
            self._outbox.append(Outgoing(rid, [], ack_token=delivery.token))
            return
        if delivery.reply_state is ReplyState.STREAMED:
            self._finish_early(delivery, ErrorEvent.fixed(ErrorCode.WORKER_LOST))
            return
        if delivery.attempt > self.config.max_deliveries:
            message = f"The request failed on {delivery.attempt - 1} workers; giving up."
            self._finish_early(delivery, ErrorEvent(ErrorCode.INTERNAL_ERROR, message))
            return
        if admission.cancelled:
            done = DoneEvent(finish_reason=FinishReason.CANCELLED, usage=Usage())
            self._finish_early(delivery, done)
            return
        now = time.time()
        max_age = self.config.max_request_age_s
        too_old = max_age is not None and now - request.created_at > max_age
        if too_old or (request.deadline is not None and now > request.deadline):
            message = "The request's deadline passed before it could start."
            self._finish_early(delivery, ErrorEvent(ErrorCode.TIMEOUT, message, retryable=True))
            return
        refs = request.image_refs()
        images: dict[str, bytes] = {}
        if refs:
            wanted = sorted({ref.sha256 for ref in refs})
            images = admission.images  # read by the IO (those that still exist)
            missing = [sha for sha in wanted if sha not in images]
            if missing:
                message = f"Image {missing[0]} expired or was never stored; send it again."
                self._finish_early(delivery, ErrorEvent(ErrorCode.IMAGE_UNAVAILABLE, message))
                return
        self.engine.add_request(request, images)
        self.observer.admitted(request)
        self._inflight[rid] = _InFlight(
            delivery=delivery, skip_start=delivery.reply_state is ReplyState.STARTED
        )

    def _finish_early(self, delivery: Delivery, event: Event) -> None:
        """A request that ends before it reaches the engine: its terminal event, then ack."""
        rid = delivery.request.request_id
        self._outbox.append(Outgoing(rid, [event], ack_token=delivery.token))
        self.observer.finished_early(delivery.request, event)

    # --- running --------------------------------------------------------------------

    def _apply_cancels(self, cancelled: set[str]) -> None:
        for rid in cancelled:
            if rid not in self._inflight or rid in self._abort_sent:
                continue  # finished meanwhile, or aborted already
            # The engine frees the slot at its next step and reports DoneEvent(CANCELLED).
            self.engine.abort(rid)
            self._abort_sent.add(rid)

    def _step(self) -> None:
        started = time.monotonic()
        try:
            events = self.engine.step()
        except Exception as exc:
            self.observer.step(time.monotonic() - started)
            self._step_failed(exc)
            return
        self.observer.step(time.monotonic() - started, events)
        self._step_failures = 0
        for rid, event in events:
            self._route(rid, event)

    def _step_failed(self, exc: Exception) -> None:
        """A step that raised cannot be pinned on one request: fail the whole batch."""
        self._step_failures += 1
        logger.exception(
            "engine step failed (%d in a row); failing %d requests",
            self._step_failures,
            len(self._inflight),
        )
        # Nothing the clients did: the batch holds other tenants' requests, so no client-error
        # code goes out either (a ValueError deep in the runner is not a bad request).
        code = _error_code_for(exc)
        if code is not ErrorCode.OUT_OF_MEMORY:
            code = ErrorCode.INTERNAL_ERROR
        for rid in list(self._inflight):
            flight = self._inflight[rid]
            self._safe_abort(rid)
            error = ErrorEvent.fixed(code, retryable=not flight.sent_text)
            self.observer.event(flight.delivery.request, error)
            self._route(rid, error)
        if self._step_failures >= self.config.max_step_failures:
            raise RuntimeError("engine failed repeatedly; stopping this worker") from exc

    def _safe_abort(self, rid: str) -> None:
        try:
            self.engine.abort(rid)
        except Exception:
            logger.exception("engine.abort(%s) failed", rid)

    def _route(self, rid: str, event: Event) -> None:
        flight = self._inflight.get(rid)
        if flight is None:
            return  # already finished here (e.g. failed with its batch): late engine output
        # Tested most frequent first: a step of a full batch is mostly one delta per request.
        terminal = False
        if isinstance(event, DeltaEvent):
            if event.text or event.reasoning:
                flight.sent_text = True
        elif isinstance(event, StartEvent):
            if flight.skip_start:
                return
        else:
            terminal = isinstance(event, TERMINAL_EVENTS)
            if isinstance(event, ErrorEvent) and event.code in SERVER_ERRORS:
                # The engine's wording of its own failure is for our log, not the client's.
                if event.message != ERROR_MESSAGES[event.code]:
                    logger.warning("request %s failed: %s (%s)", rid, event.message, event.code)
                event = ErrorEvent.fixed(event.code, retryable=event.retryable)
        ack = flight.delivery.token if terminal else None
        if flight.delivery.request.stream:
            self._outbox.append(Outgoing(rid, [event], ack_token=ack))
        else:
            flight.buffered.append(event)
            if terminal:
                self._outbox.append(Outgoing(rid, _coalesce(flight.buffered), ack_token=ack))
        if terminal:
            del self._inflight[rid]
            self._abort_sent.discard(rid)

    def _hand_over(self) -> None:
        if self._outbox:
            self.io.hand_over(self._outbox)
            self._outbox = []

    def _abandon_all(self) -> None:
        """The drain bound passed: hand back or fail what is still in flight."""
        logger.warning("drain timeout: abandoning %d requests", len(self._inflight))
        for rid in list(self._inflight):
            flight = self._inflight.pop(rid)
            self._safe_abort(rid)
            streamed = flight.delivery.request.stream and flight.sent_text
            if self.transport.supports_reclaim and not streamed:
                continue  # left pending: another worker reclaims it and no one sees a thing
            error = ErrorEvent.fixed(ErrorCode.WORKER_LOST, retryable=not streamed)
            self._outbox.append(Outgoing(rid, [error], ack_token=flight.delivery.token))
            self.observer.finished_early(flight.delivery.request, error)
        self._hand_over()
        if not self.io.flush(timeout_s=5.0):
            logger.warning("could not publish the abandoned requests' errors")

    def _heartbeat_if_due(self) -> None:
        """Build the heartbeat here (the engine's statistics), send it from the IO."""
        now = time.monotonic()
        if now < self._next_heartbeat:
            return
        self._next_heartbeat = now + self.config.heartbeat_s
        stats = self.engine.stats()
        self.observer.engine_stats(stats, backlog=self.io.backlog())
        beat = WorkerHeartbeat(
            worker_id=self.config.worker_id,
            model=self.config.model,
            running=int(stats.running),
            waiting=int(stats.waiting),
            max_batch_size=self.max_batch_size,
            kv_used_tokens=int(stats.kv_used_tokens),
            kv_capacity_tokens=int(stats.kv_capacity_tokens),
            tokens_per_second=float(stats.tokens_per_second),
            memory_bytes=int(stats.memory_bytes),
            device=str(stats.device),
            started_at=self._started_at,
            updated_at=time.time(),
            # Only the GPU engine has these (ocr-lite's stats do not).
            prefilling=int(getattr(stats, "prefilling", 0)),
            decoding=int(getattr(stats, "decoding", 0)),
            batch_bucket=int(getattr(stats, "batch_bucket", 0)),
            step_ms_p50=getattr(stats, "step_ms_p50", None),
            step_ms_p99=getattr(stats, "step_ms_p99", None),
            compiled_batch_sizes=tuple(getattr(stats, "compiled_batch_sizes", ())),
            compile_error=getattr(stats, "compile_error", None),
        )
        self.io.queue_heartbeat(beat)


def _error_code_for(exc: BaseException) -> ErrorCode:
    """The code of a request that raised ``exc``; its message is the code's fixed one."""
    # torch.cuda.OutOfMemoryError is matched by name: the worker does not import torch.
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return ErrorCode.OUT_OF_MEMORY
    if isinstance(exc, ValueError):
        return ErrorCode.INVALID_REQUEST
    return ErrorCode.INTERNAL_ERROR


def _coalesce(events: list[Event]) -> list[Event]:
    """A non-streamed reply: its start, all text as one delta, and its terminal event.

    A failed non-streamed request is all-or-nothing: only its error is sent.
    """
    if events and isinstance(events[-1], ErrorEvent):
        return [events[-1]]
    deltas = [e for e in events if isinstance(e, DeltaEvent)]
    starts = [e for e in events if isinstance(e, StartEvent)]
    out: list[Event] = [*starts[:1]]
    if deltas:
        out.append(
            DeltaEvent(
                text="".join(d.text for d in deltas),
                reasoning="".join(d.reasoning for d in deltas),
                tokens=sum(d.tokens for d in deltas),
            )
        )
    out.extend(e for e in events if isinstance(e, TERMINAL_EVENTS))
    return out
