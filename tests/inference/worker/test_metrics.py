"""The worker's Prometheus metrics (inference/worker/metrics.py) and their HTTP server.

First ``WorkerMetrics`` alone with hand-driven clocks (exact latencies), then fed by the
real loop over the real Redis with the fake engine (counts per reason and code, what a
label may hold), then ``MetricsServer``'s /metrics, /ready and /live. A worker PROCESS
serving them is in tests/monitoring/ (with Prometheus scraping it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import queue
import threading
import time
import urllib.error
import urllib.request

import msgspec
import pytest
import redis
import structlog
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from inference.engine.config import EngineStats, GlmEngineStats
from inference.protocol import (
    REQUEST_FIELD,
    DeltaEvent,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    FinishReason,
    ImageRef,
    KeySpace,
    StartEvent,
    Usage,
    encode,
)
from inference.worker.loop import Worker, WorkerConfig
from inference.worker.metrics import WorkerMetrics
from inference.worker.metrics_server import MetricsServer
from inference.worker.redis_streams import RedisWorkerTransport
from tests.inference.fakes import (
    FakeEngine,
    WorkerThread,
    make_request,
)

MODEL = "fake"


class Clock:
    """Wall and monotonic clocks the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def wall(self) -> float:
        return self.now

    def mono(self) -> float:
        return self.now - 999_000.0


def samples(metrics: WorkerMetrics, *, flush: bool = True) -> dict[tuple[str, tuple], float]:
    """Every sample of the exposition, by (name, sorted labels); ``flush=False``: only what
    was applied already (a scrape applies what is still noted first)."""
    text = (metrics.exposition() if flush else generate_latest(metrics.registry)).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: WorkerMetrics, name: str, **labels: str) -> float:
    labels.setdefault("model_name", MODEL)
    return samples(metrics)[(name, tuple(sorted(labels.items())))]


def value_unflushed(metrics: WorkerMetrics, name: str, **labels: str) -> float:
    labels.setdefault("model_name", MODEL)
    return samples(metrics, flush=False)[(name, tuple(sorted(labels.items())))]


def test_latencies_come_from_the_routed_events_timestamps():
    clock = Clock()
    m = WorkerMetrics(model=MODEL, wall_clock=clock.wall, monotonic=clock.mono)
    request = msgspec.structs.replace(make_request("hi"), created_at=clock.now)
    clock.now += 2.0  # two seconds in the queue
    m.admitted(request)
    clock.now += 0.5  # prefill
    m.step(0.5)
    m.event(request, StartEvent(prompt_tokens=7))
    clock.now += 0.1
    m.event(request, DeltaEvent(text="a", tokens=1))  # first token: 2.6 s after queueing
    clock.now += 0.3
    m.event(request, DeltaEvent(text="bcd", tokens=3))  # three tokens, 0.1 s apart
    m.step(0.02)
    m.event(request, DoneEvent(FinishReason.STOP, Usage(prompt_tokens=7, completion_tokens=4)))

    assert value(m, "inference:request_queue_time_seconds_sum") == pytest.approx(2.0)
    assert value(m, "inference:request_prefill_time_seconds_sum") == pytest.approx(0.5)
    assert value(m, "inference:time_to_first_token_seconds_sum") == pytest.approx(2.6)
    assert value(m, "inference:inter_token_latency_seconds_count") == 3
    assert value(m, "inference:inter_token_latency_seconds_sum") == pytest.approx(0.3)
    assert value(m, "inference:inter_token_latency_seconds_bucket", le="0.15") == 3
    assert value(m, "inference:inter_token_latency_seconds_bucket", le="0.075") == 0
    assert value(m, "inference:request_decode_time_seconds_sum") == pytest.approx(0.4)
    assert value(m, "inference:e2e_request_latency_seconds_sum") == pytest.approx(2.9)
    assert value(m, "inference:prompt_tokens_total") == 7
    assert value(m, "inference:generation_tokens_total") == 4
    assert value(m, "inference:request_success_total", finished_reason="stop") == 1
    assert value(m, "inference:request_success_total", finished_reason="length") == 0
    assert value(m, "inference:request_generation_tokens_sum") == 4
    # The first step ran while the request waited for its prefill; the second only decoded.
    assert value(m, "inference:engine_step_duration_seconds_count", phase="prefill") == 1
    assert value(m, "inference:engine_step_duration_seconds_count", phase="decode") == 1


def test_a_cancelled_request_counts_by_reason_but_not_in_latency():
    clock = Clock()
    m = WorkerMetrics(model=MODEL, wall_clock=clock.wall, monotonic=clock.mono)
    request = msgspec.structs.replace(make_request("hi"), created_at=clock.now)
    m.admitted(request)
    m.event(request, StartEvent(prompt_tokens=3))
    m.event(request, DoneEvent(FinishReason.CANCELLED, Usage(prompt_tokens=3)))
    assert value(m, "inference:request_success_total", finished_reason="cancelled") == 1
    assert value(m, "inference:e2e_request_latency_seconds_count") == 0


def test_engine_statistics_are_exposed_as_the_last_heartbeat_saw_them():
    m = WorkerMetrics(model=MODEL)
    assert ("inference:num_requests_running", (("model_name", MODEL),)) not in samples(m)
    stats = GlmEngineStats(
        running=3,
        waiting=2,
        max_batch_size=8,
        kv_used_tokens=1024,
        kv_capacity_tokens=4096,
        tokens_per_second=250.0,
        device="cuda:0",
        memory_bytes=7 * 2**30,
        prefilling=1,
        decoding=3,
        batch_bucket=4,
        image_cache_hits=5,
        image_cache_misses=2,
        decode_batch_sizes=(1, 2, 4, 8),
        compiled_batch_sizes=(4, 8),
        compile_error=None,
        step_ms_p50=12.0,
        step_ms_p99=30.0,
    )
    m.engine_stats(stats, backlog=1)
    assert value(m, "inference:num_requests_running") == 3
    assert value(m, "inference:num_requests_waiting") == 3  # the engine's 2 and 1 not yet in
    assert value(m, "inference:kv_cache_usage_perc") == 0.25
    assert value(m, "inference:batch_occupancy") == 0.75
    assert value(m, "inference:image_cache_hits_total") == 5
    assert value(m, "inference:image_cache_misses_total") == 2
    assert value(m, "inference:memory_used_bytes", device="cuda:0") == 7 * 2**30
    assert value(m, "inference:compiled_batch_sizes") == 2
    assert value(m, "inference:decode_batch_sizes") == 4
    assert value(m, "inference:compile_failed") == 0
    assert value(m, "inference:engine_step_p99_seconds") == pytest.approx(0.030)
    m.engine_stats(dataclasses.replace(stats, compile_error="no compiler"), backlog=0)
    assert value(m, "inference:compile_failed") == 1
    # An engine without the GLM detail (ocr-lite) reports the common part and zeros.
    plain = EngineStats(
        running=1,
        waiting=0,
        max_batch_size=4,
        kv_used_tokens=0,
        kv_capacity_tokens=0,
        tokens_per_second=1.0,
        device="cpu",
        memory_bytes=100,
    )
    m.engine_stats(plain, backlog=0)
    assert value(m, "inference:kv_cache_usage_perc") == 0
    assert value(m, "inference:batch_occupancy") == 1


# --- fed by the real loop ---------------------------------------------------------------


@pytest.fixture
def settings_(redis_settings):
    return redis_settings(claim_idle_ms=300, heartbeat_s=0.05, request_timeout_s=10.0)


@pytest.mark.redis
def test_the_loop_feeds_counts_by_reason_and_code_without_tenant_labels(settings_):
    r = redis.Redis.from_url(settings_.redis_url)
    keys = KeySpace(settings_.key_prefix)
    metrics = WorkerMetrics(model=MODEL)
    transport = RedisWorkerTransport.from_url(
        settings_.redis_url, settings=settings_, model=MODEL, worker_id="w1"
    )
    worker = Worker(
        engine=FakeEngine(max_batch_size=2),
        transport=transport,
        config=WorkerConfig(model=MODEL, worker_id="w1", heartbeat_s=0.0, idle_block_ms=10),
        observer=metrics,
    )
    missing = ImageRef(sha256=hashlib.sha256(b"gone").hexdigest(), width=1, height=1)
    good = [
        make_request(f"question {i}", tenant_id="tenant-secret-42", max_tokens=4) for i in range(3)
    ]
    bad = [
        make_request("FAIL_REQUEST now", tenant_id="tenant-secret-42"),
        make_request("look", tenant_id="tenant-secret-42", image_refs=[missing]),
        make_request("late", tenant_id="tenant-secret-42", deadline=time.time() - 1),
    ]
    try:
        transport.setup()
        for request in good + bad:
            r.xadd(keys.requests(MODEL), {REQUEST_FIELD: encode(request)})
        for _ in range(100):
            worker.run_once()
            if not worker.in_flight and not worker.engine.has_unfinished():
                if r.xlen(keys.requests(MODEL)) == 0:
                    break
        else:
            raise AssertionError("worker did not finish")
    finally:
        transport.close()
        r.close()

    assert value(metrics, "inference:request_success_total", finished_reason="length") == 3
    assert value(metrics, "inference:generation_tokens_total") == 12
    assert value(metrics, "inference:time_to_first_token_seconds_count") == 3
    assert value(metrics, "inference:inter_token_latency_seconds_count") == 9
    assert value(metrics, "inference:e2e_request_latency_seconds_count") == 3
    assert value(metrics, "inference:request_queue_time_seconds_count") == 4  # FAIL_REQUEST ran
    for code in (ErrorCode.INVALID_REQUEST, ErrorCode.IMAGE_UNAVAILABLE, ErrorCode.TIMEOUT):
        assert value(metrics, "inference:request_errors_total", code=code.value) == 1
    steps = sum(
        value(metrics, "inference:engine_step_duration_seconds_count", phase=phase)
        for phase in ("prefill", "decode")
    )
    assert steps == worker.engine.steps
    assert value(metrics, "inference:max_batch_size") == 2
    text = metrics.exposition().decode()
    assert "tenant" not in text and "req_" not in text  # no tenant or request id, anywhere
    label_names = {
        name
        for family in text_string_to_metric_families(text)
        for s in family.samples
        for name in s.labels
    }
    assert label_names <= {
        "model_name", "finished_reason", "code", "phase", "le", "device", "engine_kind"
    }  # fmt: skip


def test_a_step_batch_counts_like_its_events_one_by_one():
    clock = Clock()
    m = WorkerMetrics(model=MODEL, wall_clock=clock.wall, monotonic=clock.mono)
    first, second = (
        msgspec.structs.replace(make_request(text), created_at=clock.now) for text in "ab"
    )
    m.admitted(first)
    m.admitted(second)
    clock.now += 0.5
    m.step(0.5, [(first.request_id, StartEvent(prompt_tokens=2))])  # second still waits
    clock.now += 0.1
    m.step(
        0.1,
        [
            ("req_unknown", DeltaEvent(text="late", tokens=1)),  # not admitted: ignored
            (first.request_id, DeltaEvent(text="a", tokens=1)),
            (second.request_id, StartEvent(prompt_tokens=3)),
        ],
    )
    clock.now += 0.2
    m.step(
        0.2,
        [
            (first.request_id, DeltaEvent(text="bc", tokens=2)),
            (
                first.request_id,
                DoneEvent(FinishReason.STOP, Usage(prompt_tokens=2, completion_tokens=3)),
            ),
            (second.request_id, ErrorEvent.fixed(ErrorCode.OUT_OF_MEMORY)),
        ],
    )
    m.step(0.05, [(first.request_id, DeltaEvent(text="late", tokens=1))])  # finished: ignored

    # Both steps before the second request's StartEvent prefilled; the last two decoded.
    assert value(m, "inference:engine_step_duration_seconds_count", phase="prefill") == 2
    assert value(m, "inference:engine_step_duration_seconds_count", phase="decode") == 2
    assert value(m, "inference:prompt_tokens_total") == 5
    assert value(m, "inference:generation_tokens_total") == 3
    assert value(m, "inference:request_prefill_time_seconds_sum") == pytest.approx(0.5 + 0.6)
    assert value(m, "inference:time_to_first_token_seconds_sum") == pytest.approx(0.6)
    assert value(m, "inference:inter_token_latency_seconds_count") == 2
    assert value(m, "inference:inter_token_latency_seconds_sum") == pytest.approx(0.2)
    assert value(m, "inference:e2e_request_latency_seconds_sum") == pytest.approx(0.8)
    assert value(m, "inference:request_decode_time_seconds_sum") == pytest.approx(0.3)
    assert value(m, "inference:request_success_total", finished_reason="stop") == 1
    assert value(m, "inference:request_errors_total", code="out_of_memory") == 1


def test_while_the_loop_serves_the_metrics_are_applied_off_its_thread_and_a_scrape_sees_all():
    streams, steps = 32, 50
    finished = threading.Event()
    log_threads: set[int] = set()
    log_fields: list[dict] = []

    def on_finished(summary) -> None:
        log_threads.add(threading.get_ident())
        log_fields.append(structlog.contextvars.get_contextvars())
        if summary.request_id == requests[-1].request_id:
            finished.set()

    m = WorkerMetrics(model=MODEL, on_finished=on_finished)
    requests = [make_request(f"q{i}") for i in range(streams)]
    with structlog.contextvars.bound_contextvars(worker_id="w-7"):  # main.py's bind_process
        m.ready()  # the loop joined the queue: from here on the hooks only note
    try:
        for request in requests:
            m.admitted(request)
        m.step(0.005, [(q.request_id, StartEvent(prompt_tokens=1)) for q in requests])
        for _ in range(steps):
            m.step(0.005, [(q.request_id, DeltaEvent(text="x", tokens=1)) for q in requests])
        # Scraped at once, whatever the metrics thread applied by now: every step is in it.
        assert value(m, "inference:generation_tokens_total") == streams * steps
        assert value(m, "inference:inter_token_latency_seconds_count") == streams * (steps - 1)
        assert value(m, "inference:time_to_first_token_seconds_count") == streams
        step_count = "inference:engine_step_duration_seconds_count"
        assert value(m, step_count, phase="prefill") + value(m, step_count, phase="decode") == (
            steps + 1
        )
        # Without a scrape, the metrics thread applies (and logs) what the loop noted.
        done = [
            (
                q.request_id,
                DoneEvent(FinishReason.LENGTH, Usage(prompt_tokens=1, completion_tokens=steps)),
            )
            for q in requests
        ]
        m.step(0.005, done)
        assert finished.wait(5.0), "the noted steps were not applied"
        assert log_threads and threading.get_ident() not in log_threads
        # Logged on another thread, with the fields the loop's thread had bound.
        assert len(log_fields) == streams
        assert all(fields.get("worker_id") == "w-7" for fields in log_fields)
    finally:
        m.stopped()
    assert value(m, "inference:request_success_total", finished_reason="length") == streams
    assert value(m, "inference:request_generation_tokens_sum") == streams * steps
    assert not any(t.name == "metrics-apply" for t in threading.enumerate())


class CountingWake:
    """The applying thread's wake-up queue, counting what the loop's thread puts in it; the
    applying thread's wait for notes to gather (its timed ``get``) lasts until the test
    lets one round go (``rounds``), however slow the machine."""

    def __init__(self) -> None:
        self.inner: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.puts = 0
        self.rounds = threading.Semaphore(0)

    def put(self, item: object) -> None:
        self.puts += 1
        self.inner.put(item)

    def get(self, block: bool = True, timeout: float | None = None) -> object:
        if timeout is not None:
            assert self.rounds.acquire(timeout=10), "the test let no round go"
        return self.inner.get(block, timeout)


def test_the_metrics_thread_is_woken_once_an_interval_not_once_a_step():
    m = WorkerMetrics(model=MODEL)
    m.apply_interval_s = 0.01
    wake = CountingWake()
    m._wake = wake  # type: ignore[assignment]
    request = make_request("q")
    m.ready()
    try:
        m.admitted(request)
        for _ in range(200):
            m.step(0.001, [(request.request_id, DeltaEvent(text="x", tokens=1))])
        # The first note woke the applying thread; the next 200 gathered while it waits.
        assert wake.puts == 1
        assert value_unflushed(m, "inference:generation_tokens_total") == 0
        wake.rounds.release()  # its round: everything noted, without a scrape
        deadline = time.monotonic() + 5.0
        while value_unflushed(m, "inference:generation_tokens_total") < 200:
            assert time.monotonic() < deadline, "the gathered notes were not applied"
            time.sleep(0.01)
        # The next note after that round wakes it again, once.
        m.step(0.001, [(request.request_id, DeltaEvent(text="x", tokens=1))])
        m.step(0.001, [(request.request_id, DeltaEvent(text="x", tokens=1))])
        assert wake.puts == 2
        wake.rounds.release()
    finally:
        m.stopped()
    assert wake.puts == 3  # the stop
    assert value(m, "inference:generation_tokens_total") == 202
    assert not any(t.name == "metrics-apply" for t in threading.enumerate())


@pytest.mark.redis
def test_the_threaded_loop_feeds_exact_counts_from_the_metrics_thread(settings_):
    r = redis.Redis.from_url(settings_.redis_url)
    keys = KeySpace(settings_.key_prefix)
    good = [make_request(f"question {i}", max_tokens=4) for i in range(3)]
    bad = make_request("FAIL_REQUEST now")  # an error event out of the engine's step
    all_logged = threading.Event()
    logged: list[tuple[str, str]] = []  # (request id, thread name)

    def on_finished(summary) -> None:
        logged.append((summary.request_id, threading.current_thread().name))
        if len(logged) == 4:
            all_logged.set()

    metrics = WorkerMetrics(model=MODEL, on_finished=on_finished)
    transport = RedisWorkerTransport.from_url(
        settings_.redis_url, settings=settings_, model=MODEL, worker_id="w1"
    )
    engine = FakeEngine(max_batch_size=4, step_delay_s=0.002)
    worker = Worker(
        engine=engine,
        transport=transport,
        config=WorkerConfig(model=MODEL, worker_id="w1", idle_block_ms=10),
        observer=metrics,
    )
    thread = WorkerThread(worker)
    try:
        transport.setup()
        for request in [*good, bad]:
            r.xadd(keys.requests(MODEL), {REQUEST_FIELD: encode(request)})
        thread.start()
        assert all_logged.wait(10.0), "not every request was logged"
    finally:
        thread.stop()
        transport.close()
        r.close()

    assert {rid for rid, _ in logged} == {q.request_id for q in [*good, bad]}
    assert {name for _, name in logged} == {"metrics-apply"}  # not the engine's thread
    assert value(metrics, "inference:request_success_total", finished_reason="length") == 3
    assert value(metrics, "inference:request_errors_total", code="invalid_request") == 1
    assert value(metrics, "inference:generation_tokens_total") == 12
    assert value(metrics, "inference:time_to_first_token_seconds_count") == 3
    assert value(metrics, "inference:inter_token_latency_seconds_count") == 9
    assert value(metrics, "inference:request_queue_time_seconds_count") == 4
    steps = sum(
        value(metrics, "inference:engine_step_duration_seconds_count", phase=phase)
        for phase in ("prefill", "decode")
    )
    assert steps == engine.steps


def test_an_error_event_from_the_engine_counts_once_by_its_code():
    m = WorkerMetrics(model=MODEL)
    request = make_request("x")
    m.admitted(request)
    m.event(request, ErrorEvent.fixed(ErrorCode.OUT_OF_MEMORY))
    m.event(request, ErrorEvent.fixed(ErrorCode.OUT_OF_MEMORY))  # late: already finished
    assert value(m, "inference:request_errors_total", code="out_of_memory") == 1


# --- the HTTP server ----------------------------------------------------------------------


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_ready_follows_the_worker_state_and_live_fails_when_the_loop_stalls():
    clock = Clock()
    m = WorkerMetrics(model=MODEL, stall_s=60, wall_clock=clock.wall, monotonic=clock.mono)
    server = MetricsServer(m, host="127.0.0.1", port=0).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        m.loading()
        assert _get(base + "/ready") == (503, "loading\n")
        assert _get(base + "/live")[0] == 200
        clock.now += 600  # a long load is not a stall
        assert _get(base + "/live")[0] == 200
        m.ready()
        assert _get(base + "/ready") == (200, "ready\n")
        status, body = _get(base + "/metrics")
        assert status == 200 and 'inference:worker_ready{model_name="fake"} 1.0' in body
        assert "process_start_time_seconds" in body
        clock.now += 61  # no loop iteration for longer than stall_s
        assert _get(base + "/live")[0] == 503
        assert _get(base + "/ready")[0] == 503
        m.step(0.01)
        assert _get(base + "/live")[0] == 200
        m.draining()
        assert _get(base + "/ready") == (503, "draining\n")
        assert _get(base + "/live")[0] == 200
        assert _get(base + "/nope")[0] == 404
    finally:
        server.close()
