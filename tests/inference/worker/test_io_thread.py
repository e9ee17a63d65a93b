"""The worker's broker IO on its own thread (inference/worker/io.py) under ``Worker.run``.

``Worker.run`` drives the engine on its caller's thread (here ``WorkerThread``) and leaves
every broker call to ``WorkerIO``'s thread: these tests record which thread made each
transport call and each engine step. The synchronous path (``run_once``) is in
test_loop.py; a SIGKILLed worker process is in test_main.py (which runs this threaded path).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import defaultdict

import pytest
import redis

from inference.protocol import (
    REQUEST_FIELD,
    DeltaEvent,
    DoneEvent,
    FinishReason,
    ImageRef,
    KeySpace,
    StartEvent,
    decode_event,
    encode,
)
from inference.worker.loop import Worker, WorkerConfig
from inference.worker.redis_streams import RedisWorkerTransport
from inference.worker.transport import TransportUnavailable
from tests.inference.fakes import (
    FakeEngine,
    WorkerThread,
    fake_answer,
    make_request,
)

pytestmark = pytest.mark.redis

MODEL = "fake"


@pytest.fixture
def settings_(redis_settings):
    return redis_settings(claim_idle_ms=300, heartbeat_s=0.05, request_timeout_s=10.0)


@pytest.fixture
def r(settings_):
    client = redis.Redis.from_url(settings_.redis_url)
    yield client
    client.close()


class RecordingTransport:
    """A ``RedisWorkerTransport`` that notes the thread of every call (and can fail)."""

    def __init__(self, inner: RedisWorkerTransport) -> None:
        self.inner = inner
        self.supports_reclaim = inner.supports_reclaim
        self.calls: dict[str, set[int]] = defaultdict(set)
        self.down = threading.Event()  # set: publish raises TransportUnavailable
        self.on_cancelled = None

    def _note(self, name: str) -> None:
        self.calls[name].add(threading.get_ident())

    def setup(self):
        self._note("setup")
        return self.inner.setup()

    def fetch(self, count, block_ms):
        self._note("fetch")
        return self.inner.fetch(count, block_ms)

    def claim_stale(self, *, include_own=False):
        self._note("claim_stale")
        return self.inner.claim_stale(include_own=include_own)

    def fetch_images(self, tenant_id, sha256s):
        self._note("fetch_images")
        return self.inner.fetch_images(tenant_id, sha256s)

    def cancelled(self, request_ids):
        self._note("cancelled")
        found = self.inner.cancelled(request_ids)
        if found and self.on_cancelled is not None:
            self.on_cancelled(found)
        return found

    def publish(self, batch):
        self._note("publish")
        if self.down.is_set():
            raise TransportUnavailable("down (test)")
        return self.inner.publish(batch)

    def heartbeat(self, beat):
        self._note("heartbeat")
        return self.inner.heartbeat(beat)

    def unregister(self):
        self._note("unregister")
        return self.inner.unregister()


class CountingEngine(FakeEngine):
    """Notes the thread of each step, how many steps started, and each step's events."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.step_threads: set[int] = set()
        self.started = 0
        self.outputs: list[list] = []

    def step(self):
        self.step_threads.add(threading.get_ident())
        self.started += 1
        out = super().step()
        self.outputs.append(out)
        return out


def make_worker(settings_, engine, **config) -> tuple[Worker, RecordingTransport]:
    transport = RecordingTransport(
        RedisWorkerTransport.from_url(
            settings_.redis_url, settings=settings_, model=MODEL, worker_id="w1"
        )
    )
    config.setdefault("heartbeat_s", settings_.heartbeat_s)
    config.setdefault("claim_interval_s", 0.1)
    config.setdefault("idle_block_ms", 50)
    worker = Worker(
        engine=engine,
        transport=transport,
        config=WorkerConfig(model=MODEL, worker_id="w1", **config),
    )
    return worker, transport


def enqueue(r, settings_, request) -> None:
    r.xadd(KeySpace(settings_.key_prefix).requests(MODEL), {REQUEST_FIELD: encode(request)})


def reply(r, settings_, request_id):
    entries = r.xrange(KeySpace(settings_.key_prefix).reply(request_id))
    return [decode_event(fields[b"e"]) for _id, fields in entries]


def text_of(events) -> str:
    return "".join(e.text for e in events if isinstance(e, DeltaEvent))


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def finished(r, settings_, request) -> bool:
    events = reply(r, settings_, request.request_id)
    return bool(events) and isinstance(events[-1], DoneEvent)


def test_the_engine_thread_makes_no_broker_call(r, settings_):
    engine = CountingEngine(max_batch_size=2, step_delay_s=0.002)
    worker, transport = make_worker(settings_, engine)
    data = b"image bytes"
    ref = ImageRef(sha256=hashlib.sha256(data).hexdigest(), width=1, height=1)
    r.set(KeySpace(settings_.key_prefix).blob("tenant-a", ref.sha256), data)
    streamed = make_request("streamed answer", max_tokens=8)
    quiet = make_request("quiet answer", max_tokens=8, stream=False)
    pictured = make_request("look at this", max_tokens=4, image_refs=[ref])
    long_one = make_request("long", max_tokens=1000)
    thread = WorkerThread(worker)
    thread.start()
    try:
        for request in (streamed, quiet, pictured, long_one):
            enqueue(r, settings_, request)
        wait_for(lambda: all(finished(r, settings_, q) for q in (streamed, quiet, pictured)))
        r.set(KeySpace(settings_.key_prefix).cancel(long_one.request_id), b"1")
        wait_for(lambda: finished(r, settings_, long_one))
    finally:
        thread.stop()
    for request in (streamed, quiet, pictured):
        assert text_of(reply(r, settings_, request.request_id)) == fake_answer(request)
    assert reply(r, settings_, long_one.request_id)[-1].finish_reason == FinishReason.CANCELLED

    assert engine.step_threads == {thread.ident}
    wanted = {
        "setup", "claim_stale", "fetch", "fetch_images", "cancelled", "publish", "heartbeat",
        "unregister",
    }  # fmt: skip
    assert wanted <= set(transport.calls)
    callers = set().union(*transport.calls.values())
    assert thread.ident not in callers  # not one broker call from the engine's thread
    assert len(callers) == 1  # all from the IO thread


@pytest.mark.parametrize("prefetch", [0, 4])
def test_a_cancel_frees_the_slot_within_one_step_of_reaching_the_worker(r, settings_, prefetch):
    engine = CountingEngine(max_batch_size=1, step_delay_s=0.02)
    worker, transport = make_worker(settings_, engine, prefetch=prefetch)
    long_one, next_one = make_request("long", max_tokens=1000), make_request("next", max_tokens=2)
    seen_at: list[int] = []  # steps started when the IO thread read the cancel mark
    transport.on_cancelled = lambda found: seen_at.append(engine.started)
    thread = WorkerThread(worker)
    thread.start()
    try:
        enqueue(r, settings_, long_one)
        wait_for(lambda: engine.started >= 3)
        enqueue(r, settings_, next_one)
        time.sleep(0.1)
        # The one slot is taken; with prefetch the next request waits in the engine's
        # queue (prepared there), without it in the broker's.
        waiting = [next_one.request_id] if prefetch else []
        assert engine.added == [long_one.request_id, *waiting]
        assert engine.stats().running == 1
        r.set(KeySpace(settings_.key_prefix).cancel(long_one.request_id), b"1")
        wait_for(lambda: finished(r, settings_, next_one))
    finally:
        thread.stop()
    cancelled_in = next(
        i + 1
        for i, out in enumerate(engine.outputs)
        for rid, event in out
        if rid == long_one.request_id and isinstance(event, DoneEvent)
    )
    assert reply(r, settings_, long_one.request_id)[-1].finish_reason == FinishReason.CANCELLED
    # Read during step n (the one running then): the engine's thread aborts it before the
    # next step it starts, n + 1, which frees the slot; n + 2 only when the mark arrived in
    # the few microseconds between the thread's hand-over and the start of step n + 1.
    assert seen_at and cancelled_in <= seen_at[0] + 2, (seen_at, cancelled_in)
    assert text_of(reply(r, settings_, next_one.request_id)) == fake_answer(next_one)


def test_the_engine_waits_while_the_broker_is_down_and_nothing_is_lost(r, settings_):
    engine = CountingEngine(max_batch_size=2, step_delay_s=0.005)
    worker, transport = make_worker(settings_, engine, max_unpublished_steps=2)
    request = make_request("through an outage", max_tokens=80)
    thread = WorkerThread(worker)
    thread.start()
    try:
        enqueue(r, settings_, request)
        wait_for(lambda: len(reply(r, settings_, request.request_id)) >= 3)
        transport.down.set()
        time.sleep(0.3)  # 60 steps' worth
        during = engine.started
        time.sleep(0.3)
        assert engine.started - during <= 1  # stopped, at most max_unpublished_steps ahead
        transport.down.clear()
        wait_for(lambda: finished(r, settings_, request))
    finally:
        thread.stop()
    events = reply(r, settings_, request.request_id)
    assert [type(e) for e in events].count(StartEvent) == 1
    assert text_of(events) == fake_answer(request)  # in order, once each
    assert r.xlen(KeySpace(settings_.key_prefix).requests(MODEL)) == 0


def test_the_one_thread_loop_is_still_there(r, settings_):
    engine = CountingEngine(max_batch_size=2)
    worker, transport = make_worker(settings_, engine, io_thread=False)
    requests = [make_request(f"question {i}", max_tokens=5, stream=i % 2 == 0) for i in range(4)]
    thread = WorkerThread(worker)
    thread.start()
    try:
        for request in requests:
            enqueue(r, settings_, request)
        wait_for(lambda: all(finished(r, settings_, q) for q in requests))
    finally:
        thread.stop()
    for request in requests:
        assert text_of(reply(r, settings_, request.request_id)) == fake_answer(request)
    assert set().union(*transport.calls.values()) == {thread.ident} == engine.step_threads


def test_the_io_threads_log_lines_carry_the_processs_bound_fields(settings_):
    """The worker binds its model and id once (``bind_process``); the IO thread it starts
    logs in that context too (a reclaim warning names the worker that took the request)."""
    import structlog

    from inference.worker.io import WorkerIO

    seen: dict[str, object] = {}
    transport = RecordingTransport(
        RedisWorkerTransport.from_url(
            settings_.redis_url, settings=settings_, model=MODEL, worker_id="ctx-worker"
        )
    )
    original_setup = transport.setup

    def setup():
        seen.update(structlog.contextvars.get_contextvars())
        return original_setup()

    transport.setup = setup
    io = WorkerIO(transport=transport, max_batch_size=4, claim_interval_s=1.0, idle_block_ms=10)
    stop = threading.Event()
    structlog.contextvars.bind_contextvars(worker_id="ctx-worker", model=MODEL)
    try:
        io.start(stop)
        assert io.wait_ready(stop)
    finally:
        structlog.contextvars.unbind_contextvars("worker_id", "model")
        stop.set()
        io.close(unregister=True)
    assert seen.get("worker_id") == "ctx-worker" and seen.get("model") == MODEL
