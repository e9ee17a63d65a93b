"""Prometheus metrics of one inference worker, and the small HTTP server that serves them.

Names and meanings follow vLLM's (``vllm:num_requests_running`` ...) under the prefix
``inference:``, so operators' queries and dashboards carry over. Three sources:

- the engine's own statistics (``Engine.stats()``), snapshotted at every heartbeat of the
  loop (every ``INFERENCE_HEARTBEAT_SECONDS``) and exposed as they were then: requests
  running and waiting, KV-cache use, batch occupancy, step-time percentiles, image-cache
  hits, memory, compile state;
- the events the loop routes, timed here (``time.time()`` against the request's
  ``created_at``, which the web side stamps when it queues the request, so queue time,
  time to first token and end-to-end latency include the wait in Redis; the two hosts'
  clocks are assumed NTP-synchronised, and a negative difference counts as 0): queue time,
  prefill and decode time, time to first token, inter-token latency, tokens, finished
  requests by reason, errors by code;
- the loop itself: wall time of each ``engine.step()``, readiness and draining.

Label cardinality is bounded by construction: ``model_name`` (one per worker process),
``finished_reason`` (``FinishReason``), ``code`` (``ErrorCode``), ``phase`` (two values),
``device`` and ``engine_kind`` (one per process). No tenant, request or worker id is ever a
label: Prometheus adds ``instance`` per scraped process, and per-tenant figures come from
the web side's usage records, not from metrics.

``MetricsServer`` serves ``/metrics`` (the exposition), ``/ready`` (200 once the model is
loaded and warmed and the loop has joined the queue, 503 while loading, draining or
stalled) and ``/live`` (200 unless the loop has not come round for ``stall_s`` seconds:
a hung engine step; 200 while the model loads, which has no such bound). Kubernetes' probes
and ``docker compose`` health checks use them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

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


@dataclass
class _Timing:
    """One admitted request's clock readings (loop thread only)."""

    created_at: float  # wall clock, stamped by the web side
    admitted: float  # monotonic, from here on
    started: float | None = None  # StartEvent: prefill done
    last_token: float | None = None
    queue_s: float = 0.0
    ttft_s: float | None = None


class WorkerMetrics(LoopObserver):
    """The worker's metrics; a ``LoopObserver`` the loop feeds (see the module docstring).

    Each instance has its own ``CollectorRegistry`` (``registry``), so tests and the
    embedded mode can hold several without clashing in the process-wide default one.
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
        self.registry.register(_EngineCollector(self))
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

    # --- LoopObserver ---------------------------------------------------------------

    def loading(self) -> None:
        self._state = "loading"

    def ready(self) -> None:
        self._tick()
        self._state = "ready"

    def draining(self) -> None:
        self._tick()
        self._state = "draining"

    def stopped(self) -> None:
        self._state = "stopped"
        self._timings.clear()

    def admitted(self, request: InferenceRequest) -> None:
        self._tick()
        queue_s = max(0.0, self._wall() - request.created_at)
        self._timings[request.request_id] = _Timing(
            created_at=request.created_at, admitted=self._mono(), queue_s=queue_s
        )
        self.queue_time.observe(queue_s)

    def event(self, request: InferenceRequest, event: Event) -> None:
        timing = self._timings.get(request.request_id)
        if timing is None:
            return
        now = self._mono()
        if isinstance(event, StartEvent):
            if timing.started is None:
                timing.started = now
                self.prefill_time.observe(now - timing.admitted)
            self.prompt_tokens.inc(event.prompt_tokens)
        elif isinstance(event, DeltaEvent):
            if event.tokens > 0:
                self.generation_tokens.inc(event.tokens)
                if timing.last_token is None:
                    timing.ttft_s = max(0.0, self._wall() - timing.created_at)
                    self.ttft.observe(timing.ttft_s)
                else:
                    gap = (now - timing.last_token) / event.tokens
                    for _ in range(event.tokens):
                        self.itl.observe(gap)
                timing.last_token = now
        elif isinstance(event, DoneEvent):
            del self._timings[request.request_id]
            self._done(event)
            e2e = max(0.0, self._wall() - timing.created_at)
            if event.finish_reason is not FinishReason.CANCELLED:
                self.e2e.observe(e2e)
                if timing.started is not None:
                    self.decode_time.observe(now - timing.started)
            self._summarise(request, event, timing, e2e)
        elif isinstance(event, ErrorEvent):
            del self._timings[request.request_id]
            self.errors.labels(self.model, event.code.value).inc()
            self._summarise(request, event, timing, max(0.0, self._wall() - timing.created_at))

    def finished_early(self, request: InferenceRequest, event: Event) -> None:
        timing = self._timings.pop(request.request_id, None)
        if isinstance(event, DoneEvent):
            self._done(event)
        elif isinstance(event, ErrorEvent):
            self.errors.labels(self.model, event.code.value).inc()
        else:
            return
        self._summarise(request, event, timing, max(0.0, self._wall() - request.created_at))

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

    def step(self, seconds: float) -> None:
        self._tick()
        # The loop calls this before routing the step's events: a request not started
        # yet was (or was waiting to be) prefilled in this step.
        prefilling = any(t.started is None for t in self._timings.values())
        (self.step_prefill if prefilling else self.step_decode).observe(seconds)

    def engine_stats(self, stats: EngineStats, *, backlog: int) -> None:
        self._tick()
        self.backlog = backlog
        self.last_stats = stats

    # --- exposition ---------------------------------------------------------------------

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """The engine's last snapshot and the worker's state, read at scrape time."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # unchecked: names depend on nothing registered elsewhere

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        m = self.metrics
        model = m.model
        labels = ["model_name"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            family.add_metric([model], value)
            return family

        state = m.state
        yield gauge(
            "worker_ready",
            "1 when the model is loaded and warmed and the loop takes work (the /ready answer).",
            1.0 if m.is_ready() else 0.0,
        )
        yield gauge(
            "worker_draining",
            "1 after SIGTERM: no new work, the batch finishes.",
            1.0 if state == "draining" else 0.0,
        )
        yield gauge(
            "worker_start_time_seconds",
            "Unix time this worker process started (changes() over it counts restarts).",
            m.started_at,
        )
        info = GaugeMetricFamily(
            PREFIX + "worker_info",
            "Always 1; the worker's engine kind and device as labels.",
            labels=["model_name", "engine_kind", "device"],
        )
        stats = m.last_stats
        info.add_metric([model, m.engine_kind, str(stats.device) if stats else ""], 1.0)
        yield info
        if stats is None:
            return  # loading: no engine to report on yet
        cap = stats.kv_capacity_tokens
        yield gauge(
            "num_requests_running",
            "Requests holding a batch slot (decoding or prefilling).",
            stats.running,
        )
        yield gauge(
            "num_requests_waiting",
            "Requests taken by this worker and waiting for a "
            "batch slot (in the engine or not yet handed to it).",
            stats.waiting + m.backlog,
        )
        yield gauge(
            "num_requests_prefilling",
            "Of the running requests, those whose prompt is still being prefilled.",
            getattr(stats, "prefilling", 0),
        )
        yield gauge("max_batch_size", "Batch slots of this worker.", stats.max_batch_size)
        yield gauge(
            "kv_cache_usage_perc",
            "KV-cache use: 1 means full (0 for engines without one).",
            stats.kv_used_tokens / cap if cap else 0.0,
        )
        yield gauge("kv_cache_used_tokens", "Tokens held in the KV cache.", stats.kv_used_tokens)
        yield gauge("kv_cache_capacity_tokens", "Tokens the KV cache holds at most.", cap)
        yield gauge(
            "generation_tokens_per_second",
            "The engine's generation rate over its recent window.",
            stats.tokens_per_second,
        )
        decoding = getattr(stats, "decoding", 0)
        bucket = getattr(stats, "batch_bucket", 0)
        yield gauge("decode_batch_size", "Rows of the last decode step.", decoding)
        yield gauge(
            "decode_batch_bucket",
            "Padded batch size (compiled shape) of the last decode step.",
            bucket,
        )
        yield gauge(
            "batch_occupancy",
            "Real rows over padded rows of the last decode step (1 when none ran).",
            decoding / bucket if bucket else 1.0,
        )
        p50 = getattr(stats, "step_ms_p50", None)
        p99 = getattr(stats, "step_ms_p99", None)
        if p50 is not None and p99 is not None:
            yield gauge(
                "engine_step_p50_seconds",
                "Median of the engine's recent decoding steps (the engine's own window).",
                p50 / 1e3,
            )
            yield gauge(
                "engine_step_p99_seconds",
                "99th percentile of the engine's recent decoding steps.",
                p99 / 1e3,
            )
        memory = GaugeMetricFamily(
            PREFIX + "memory_used_bytes",
            "Memory the engine holds on its device (CUDA: allocated by torch; CPU: weights "
            "and KV cache, or the process's resident set for ocr-lite).",
            labels=["model_name", "device"],
        )
        memory.add_metric([model, str(stats.device)], stats.memory_bytes)
        yield memory
        for kind in ("hits", "misses"):
            counter = CounterMetricFamily(
                PREFIX + f"image_cache_{kind}",
                f"Image-embedding cache {kind} (a hit skips the vision tower).",
                labels=labels,
            )
            counter.add_metric([model], getattr(stats, f"image_cache_{kind}", 0))
            yield counter
        compiled = tuple(getattr(stats, "compiled_batch_sizes", ()))
        yield gauge(
            "compiled_batch_sizes", "Decode batch buckets running compiled code.", len(compiled)
        )
        yield gauge(
            "decode_batch_sizes",
            "Decode batch buckets the engine has.",
            len(tuple(getattr(stats, "decode_batch_sizes", ()))),
        )
        yield gauge(
            "compile_failed",
            "1 when compiling the decode layer failed (every bucket "
            "then runs eager; the reason is in the log).",
            1.0 if getattr(stats, "compile_error", None) else 0.0,
        )
        yield gauge(
            "cuda_graphs_enabled",
            "1 when decode shapes replay CUDA graphs.",
            1.0 if getattr(stats, "cuda_graphs", False) else 0.0,
        )
        warmup = getattr(stats, "warmup_seconds", None)
        if warmup is not None:
            yield gauge(
                "warmup_seconds",
                "Seconds the engine's warm-up (compile and graph capture) took.",
                warmup,
            )


class MetricsServer:
    """``/metrics``, ``/ready`` and ``/live`` of one ``WorkerMetrics`` on a port of its own,
    served from a daemon thread. ``port=0`` takes a free port (``.port`` says which)."""

    def __init__(self, metrics: WorkerMetrics, *, host: str = "0.0.0.0", port: int = 9400) -> None:
        self.metrics = metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, metrics.exposition(), CONTENT_TYPE_LATEST)
                elif path == "/ready":
                    ok = metrics.is_ready()
                    self._send(200 if ok else 503, metrics.state.encode() + b"\n")
                elif path == "/live":
                    ok = metrics.is_live()
                    self._send(200 if ok else 503, b"ok\n" if ok else b"stalled\n")
                else:
                    self._send(404, b"not found\n")

            def _send(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes and probes every few seconds: not worth a log line

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-server", daemon=True
        )

    def start(self) -> MetricsServer:
        self._thread.start()
        logger.info("metrics on :%d (/metrics, /ready, /live)", self.port)
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
