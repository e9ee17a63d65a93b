"""Prometheus metrics of one inference worker.

Names and meanings follow vLLM's (``vllm:num_requests_running`` ...) under the prefix
``inference:``, so operators' queries and dashboards carry over. Three sources:

- the engine's own statistics (``Engine.stats()``), snapshotted at every heartbeat of the
  loop (every ``INFERENCE_HEARTBEAT_SECONDS``) and exposed as they were then: requests
  running and waiting, KV-cache use, batch occupancy, step-time percentiles, image-cache
  hits, memory, compile state (gauges read at scrape time: ``inference.worker.engine_gauges``);
- the events the loop routes, timed here (``time.time()`` against the request's
  ``created_at``, which the web side stamps when it queues the request, so queue time,
  time to first token and end-to-end latency include the wait in Redis; the two hosts'
  clocks are assumed NTP-synchronised, and a negative difference counts as 0): queue time,
  prefill and decode time, time to first token, inter-token latency, tokens, finished
  requests by reason, errors by code;
- the loop itself: wall time of each ``engine.step()``, readiness and draining.

The loop's thread drives the engine, so its hooks only note what happened (the step's
event list as the engine returned it, and one wall and one monotonic clock reading per
hook, not per event) in a queue; the histograms, counters and request log lines are
applied from that queue by a thread of their own (``metrics-apply``, running between the
loop's ``ready`` and ``stopped``) while the engine runs. That thread is woken by the first
note after its last round and then lets the next ``APPLY_INTERVAL_S`` of notes gather
before it applies them: one wake-up of it per interval, not one per engine step (a
wake-up per step cost the engine's thread ~2.6 ms of CPU a request on this project's
2-core machine, docs/benchmarks.md "Metrics thread wake-ups"). A scrape applies
whatever is still queued first, so ``/metrics`` shows every event routed before it
began; a request's log line comes about an interval after its end. Outside those
bounds (tests driving ``Worker.run_once``, hooks called by hand) each hook is applied at
once, on its caller's thread.

Label cardinality is bounded by construction: ``model_name`` (one per worker process),
``finished_reason`` (``FinishReason``), ``code`` (``ErrorCode``), ``phase`` (two values),
``device`` and ``engine_kind`` (one per process). No tenant, request or worker id is ever a
label: Prometheus adds ``instance`` per scraped process, and per-tenant figures come from
the web side's usage records, not from metrics.

``inference.worker.metrics_server.MetricsServer`` serves them over HTTP with the worker's
readiness and liveness (``is_ready``, ``is_live``).
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from inference.engine.config import EngineStats
from inference.protocol import (
    DeltaEvent,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    Event,
    FinishReason,
    InferenceRequest,
    StartEvent,
)
from inference.worker.engine_gauges import EngineGauges
from inference.worker.logs import RequestSummary
from inference.worker.observer import LoopObserver

logger = logging.getLogger("inference.worker")

PREFIX = "inference:"

# Buckets as vLLM's (v1) for the same histograms, so percentiles compare across the two.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_TIME_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0,
)  # fmt: skip
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)
STEP_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5,
    1.0, 2.5, 5.0,
)  # fmt: skip


@dataclass(slots=True)
class _Timing:
    """One admitted request's clock readings (touched only while applying)."""

    request: InferenceRequest
    admitted: float  # monotonic, from here on (``request.created_at`` is the web's wall)
    started: float | None = None  # StartEvent: prefill done
    last_token: float | None = None
    queue_s: float = 0.0
    ttft_s: float | None = None


# What a hook noted for the applying thread: the method that applies it, and its arguments.
_Noted = tuple[Callable[..., None], tuple[object, ...]]
_STOP = object()  # tells the applying thread to return
_STOP_TIMEOUT_S = 5.0


# How long the applying thread lets notes gather after the one that woke it (see above).
APPLY_INTERVAL_S = 0.05


class WorkerMetrics(LoopObserver):
    """The worker's metrics; a ``LoopObserver`` the loop feeds (see the module docstring).

    Each instance has its own ``CollectorRegistry`` (``registry``), so tests and the
    embedded mode can hold several without clashing in the process-wide default one.

    Threads: the hooks are called from the loop's thread and only note (see the module
    docstring); ``_timings`` and ``_unstarted`` are touched only by whoever applies, one
    thread at a time under ``_apply_lock`` (the ``metrics-apply`` thread, or a scrape's
    ``flush``), in the order the hooks were called. The state, the last tick and the
    last engine statistics are plain attributes the loop's thread replaces whole.
    """

    def __init__(
        self,
        *,
        model: str,
        engine_kind: str = "glm4v",
        registry: CollectorRegistry | None = None,
        stall_s: float = 300.0,
        on_finished: Callable[[RequestSummary], None] | None = None,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self.engine_kind = engine_kind
        self.stall_s = stall_s
        self.on_finished = on_finished  # the request log (inference.worker.logs)
        self._wall = wall_clock
        self._mono = monotonic
        self.registry = registry if registry is not None else CollectorRegistry()
        self._timings: dict[str, _Timing] = {}
        self._unstarted = 0  # of _timings, those whose StartEvent has not come yet
        self._noted: deque[_Noted] = deque()  # appended by the loop, popped when applied
        self._wake: queue.SimpleQueue[object] = queue.SimpleQueue()  # never blocks a put
        # Set by the loop's thread when it woke the applying thread, cleared by that thread
        # before its round: the notes in between wake nobody.
        self._wake_sent = False
        self.apply_interval_s = APPLY_INTERVAL_S
        self._apply_lock = threading.Lock()
        self._applier: threading.Thread | None = None  # only the loop's thread sets it
        # The loop's context (the log fields bound to it: model, worker id), in which
        # every later application runs, so request log lines carry them from any thread.
        self._context: contextvars.Context | None = None
        self.last_stats: EngineStats | None = None  # replaced whole: read by the HTTP thread
        self.backlog = 0
        self._state = "starting"  # starting, loading, ready, draining, stopped
        self._last_tick = monotonic()
        self.started_at = wall_clock()

        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            metric = Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=self.registry)
            return metric

        self.ttft = histogram(
            "time_to_first_token_seconds",
            "From the request's queueing by the web side to its first generated token.",
            TTFT_BUCKETS,
        ).labels(model)
        self.itl = histogram(
            "inter_token_latency_seconds",
            "Time between two generated tokens of one request (a delta of n tokens counts "
            "n times its gap over n).",
            ITL_BUCKETS,
        ).labels(model)
        self.e2e = histogram(
            "e2e_request_latency_seconds",
            "From queueing to the end of a request that finished (stop or length).",
            REQUEST_TIME_BUCKETS,
        ).labels(model)
        self.queue_time = histogram(
            "request_queue_time_seconds",
            "From queueing to admission into this worker's engine (the wait in Redis).",
            REQUEST_TIME_BUCKETS,
        ).labels(model)
        self.prefill_time = histogram(
            "request_prefill_time_seconds",
            "From admission into the engine to the end of the prompt's prefill (StartEvent).",
            REQUEST_TIME_BUCKETS,
        ).labels(model)
        self.decode_time = histogram(
            "request_decode_time_seconds",
            "From the end of prefill to the request's last token.",
            REQUEST_TIME_BUCKETS,
        ).labels(model)
        self.request_prompt_tokens = histogram(
            "request_prompt_tokens",
            "Prompt tokens (images included) of each finished request.",
            TOKEN_BUCKETS,
        ).labels(model)
        self.request_generation_tokens = histogram(
            "request_generation_tokens",
            "Generated tokens of each finished request.",
            TOKEN_BUCKETS,
        ).labels(model)
        step = Histogram(
            PREFIX + "engine_step_duration_seconds",
            "Wall time of one engine step; phase=prefill when a prompt of the batch was "
            "still to be prefilled (such a step also decodes), decode otherwise.",
            ["model_name", "phase"],
            buckets=STEP_BUCKETS,
            registry=self.registry,
        )
        self.step_prefill = step.labels(model, "prefill")
        self.step_decode = step.labels(model, "decode")
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens",
            "Prompt tokens prefilled (a request run again after a worker was lost counts "
            "again: it is prefilled again).",
            labels,
            registry=self.registry,
        ).labels(model)
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens",
            "Tokens generated.",
            labels,
            registry=self.registry,
        ).labels(model)
        self.success = Counter(
            PREFIX + "request_success",
            "Requests finished, by finish reason (stop, length, cancelled).",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self.errors = Counter(
            PREFIX + "request_errors",
            "Requests ended by an error event, by error code (inference.protocol.ErrorCode).",
            ["model_name", "code"],
            registry=self.registry,
        )
        # Every series exists from the start, so rate() and ratios see 0, not nothing.
        for reason in FinishReason:
            self.success.labels(model, reason.value)
        for code in ErrorCode:
            self.errors.labels(model, code.value)
        self.registry.register(EngineGauges(self, prefix=PREFIX))
        ProcessCollector(registry=self.registry)

    # --- state ----------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    def is_ready(self) -> bool:
        return self._state == "ready" and not self.stalled()

    def is_live(self) -> bool:
        return not self.stalled()

    def stalled(self) -> bool:
        """The loop came round no more in ``stall_s`` (only once it serves: a load is
        bounded by the orchestrator's start-up probe, not here)."""
        if self._state not in ("ready", "draining"):
            return False
        return self._mono() - self._last_tick > self.stall_s

    def _tick(self) -> None:
        self._last_tick = self._mono()

    # --- LoopObserver (the loop's thread: note, do not apply) -----------------------

    def loading(self) -> None:
        self._state = "loading"

    def ready(self) -> None:
        self._tick()
        self._state = "ready"
        if self._applier is None:
            self._context = contextvars.copy_context()
            self._wake_sent = False
            self._applier = threading.Thread(
                target=self._apply_until_stopped, name="metrics-apply", daemon=True
            )
            self._applier.start()

    def draining(self) -> None:
        self._tick()
        self._state = "draining"

    def stopped(self) -> None:
        self._state = "stopped"
        self._note(self._timings.clear)
        applier, self._applier = self._applier, None
        if applier is not None:
            self._wake.put(_STOP)
            applier.join(_STOP_TIMEOUT_S)
            if applier.is_alive():  # stuck in a request log line: do not hang the stop
                logger.warning("the metrics thread did not stop in %.0fs", _STOP_TIMEOUT_S)
                return
        self.flush()  # what came after the applying thread's last round

    def admitted(self, request: InferenceRequest) -> None:
        now = self._mono()
        self._last_tick = now
        self._note(self._apply_admitted, request, now, self._wall())

    def event(self, request: InferenceRequest, event: Event) -> None:
        self._note(self._apply_event, request.request_id, event, self._mono(), self._wall())

    def finished_early(self, request: InferenceRequest, event: Event) -> None:
        self._note(self._apply_finished_early, request, event, self._wall())

    def step(self, seconds: float, events: Sequence[tuple[str, Event]] = ()) -> None:
        now = self._mono()
        self._last_tick = now
        self._note(self._apply_step, seconds, events, now, self._wall())

    def engine_stats(self, stats: EngineStats, *, backlog: int) -> None:
        self._tick()
        self.backlog = backlog
        self.last_stats = stats

    def _note(self, apply: Callable[..., None], *args: object) -> None:
        """Queue ``apply(*args)``; apply it now when no applying thread runs."""
        self._noted.append((apply, args))
        if self._applier is None:
            self.flush()
        elif not self._wake_sent:
            self._wake_sent = True
            self._wake.put(None)

    # --- applying (one thread at a time, in the order noted) ---------------------------

    def flush(self) -> None:
        """Apply everything noted so far (on the caller's thread, after the applying
        thread's current round)."""
        with self._apply_lock:
            if self._context is None:
                self._apply_noted()
            else:  # entered by one thread at a time: under the lock
                self._context.run(self._apply_noted)

    def _apply_noted(self) -> None:
        noted = self._noted
        while noted:
            apply, args = noted.popleft()
            try:
                apply(*args)
            except Exception:  # a metric must never stop the loop, nor this thread
                logger.exception("applying worker metrics failed")

    def _apply_until_stopped(self) -> None:
        wake = self._wake
        while True:
            token = wake.get()
            if token is not _STOP:
                # Let the next notes gather (nothing but the stop is put meanwhile).
                try:
                    token = wake.get(timeout=self.apply_interval_s)
                except queue.Empty:
                    pass
            self._wake_sent = False  # before the round: a note after it wakes the next one
            self.flush()
            if token is _STOP:
                return

    def _apply_admitted(self, request: InferenceRequest, mono: float, wall: float) -> None:
        queue_s = max(0.0, wall - request.created_at)
        old = self._timings.get(request.request_id)
        if old is not None and old.started is None:
            self._unstarted -= 1  # admitted again: the new timing replaces it
        self._timings[request.request_id] = _Timing(request=request, admitted=mono, queue_s=queue_s)
        self._unstarted += 1
        self.queue_time.observe(queue_s)

    def _apply_step(
        self, seconds: float, events: Sequence[tuple[str, Event]], mono: float, wall: float
    ) -> None:
        # Noted before the step's events: a request not started yet was (or was waiting
        # to be) prefilled in this step.
        (self.step_prefill if self._unstarted else self.step_decode).observe(seconds)
        for rid, event in events:
            self._apply_event(rid, event, mono, wall)

    def _apply_event(self, rid: str, event: Event, mono: float, wall: float) -> None:
        timing = self._timings.get(rid)
        if timing is None:
            return  # not admitted here, or finished already: the loop drops it too
        if isinstance(event, DeltaEvent):
            tokens = event.tokens
            if tokens > 0:
                self.generation_tokens.inc(tokens)
                if timing.last_token is None:
                    timing.ttft_s = max(0.0, wall - timing.request.created_at)
                    self.ttft.observe(timing.ttft_s)
                else:
                    gap = (mono - timing.last_token) / tokens
                    for _ in range(tokens):
                        self.itl.observe(gap)
                timing.last_token = mono
        elif isinstance(event, StartEvent):
            if timing.started is None:
                timing.started = mono
                self._unstarted -= 1
                self.prefill_time.observe(mono - timing.admitted)
            self.prompt_tokens.inc(event.prompt_tokens)
        elif isinstance(event, DoneEvent):
            self._forget(rid, timing)
            self._done(event)
            e2e = max(0.0, wall - timing.request.created_at)
            if event.finish_reason is not FinishReason.CANCELLED:
                self.e2e.observe(e2e)
                if timing.started is not None:
                    self.decode_time.observe(mono - timing.started)
            self._summarise(timing.request, event, timing, e2e)
        elif isinstance(event, ErrorEvent):
            self._forget(rid, timing)
            self.errors.labels(self.model, event.code.value).inc()
            e2e = max(0.0, wall - timing.request.created_at)
            self._summarise(timing.request, event, timing, e2e)

    def _apply_finished_early(self, request: InferenceRequest, event: Event, wall: float) -> None:
        timing = self._timings.get(request.request_id)
        if timing is not None:
            self._forget(request.request_id, timing)
        if isinstance(event, DoneEvent):
            self._done(event)
        elif isinstance(event, ErrorEvent):
            self.errors.labels(self.model, event.code.value).inc()
        else:
            return
        self._summarise(request, event, timing, max(0.0, wall - request.created_at))

    def _forget(self, rid: str, timing: _Timing) -> None:
        del self._timings[rid]
        if timing.started is None:
            self._unstarted -= 1

    def _summarise(
        self,
        request: InferenceRequest,
        event: DoneEvent | ErrorEvent,
        timing: _Timing | None,
        e2e_s: float,
    ) -> None:
        if self.on_finished is None:
            return
        if isinstance(event, DoneEvent):
            outcome, code = event.finish_reason.value, None
            prompt, completion = event.usage.prompt_tokens, event.usage.completion_tokens
        else:
            outcome, code, prompt, completion = "error", event.code.value, 0, 0
        summary = RequestSummary(
            request_id=request.request_id,
            tenant_id=request.tenant_id,
            model=request.model,
            outcome=outcome,
            error_code=code,
            stream=request.stream,
            queue_s=timing.queue_s if timing else None,
            ttft_s=timing.ttft_s if timing else None,
            e2e_s=e2e_s,
            prompt_tokens=prompt,
            completion_tokens=completion,
        )
        try:
            self.on_finished(summary)
        except Exception:  # a log line must never stop the loop
            logger.exception("request log failed")

    def _done(self, event: DoneEvent) -> None:
        self.success.labels(self.model, event.finish_reason.value).inc()
        self.request_prompt_tokens.observe(event.usage.prompt_tokens)
        self.request_generation_tokens.observe(event.usage.completion_tokens)

    # --- exposition ---------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The exposition text, after applying what the loop noted before this call."""
        self.flush()
        return generate_latest(self.registry)
