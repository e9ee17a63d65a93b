"""The worker loop (inference/worker/loop.py) over the real Redis, with the fake engine.

Most tests drive ``Worker.run_once`` by hand so that "within one step" is exact; the rest
run ``Worker.run`` in a thread. Process-level behaviour is in test_main.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time

import msgspec
import pytest
import redis

from inference.client.redis_streams import RedisStreamsClient
from inference.protocol import (
    REQUEST_FIELD,
    DeltaEvent,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    FinishReason,
    ImageRef,
    KeySpace,
    NoticeEvent,
    StartEvent,
    encode,
)
from inference.worker.loop import Worker, WorkerConfig
from inference.worker.redis_streams import RedisWorkerTransport
from inference.worker.transport import Outgoing, TransportUnavailable
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
    return redis_settings(claim_idle_ms=300, heartbeat_s=0.2, request_timeout_s=10.0)


@pytest.fixture
def r(settings_):
    client = redis.Redis.from_url(settings_.redis_url)
    yield client
    client.close()


@pytest.fixture
async def client(settings_):
    c = RedisStreamsClient(settings=settings_)
    yield c
    await c.aclose()


def make_worker(settings_, worker_id="w1", *, engine=None, **config) -> Worker:
    transport = RedisWorkerTransport.from_url(
        settings_.redis_url, settings=settings_, model=MODEL, worker_id=worker_id
    )
    config.setdefault("heartbeat_s", settings_.heartbeat_s)
    config.setdefault("claim_interval_s", 0.1)
    config.setdefault("idle_block_ms", 50)
    return Worker(
        engine=engine or FakeEngine(),
        transport=transport,
        config=WorkerConfig(model=MODEL, worker_id=worker_id, **config),
    )


def enqueue(r, settings_, request) -> None:
    r.xadd(KeySpace(settings_.key_prefix).requests(MODEL), {REQUEST_FIELD: encode(request)})


def reply(r, settings_, request_id):
    from inference.protocol import decode_event

    entries = r.xrange(KeySpace(settings_.key_prefix).reply(request_id))
    return [decode_event(fields[b"e"]) for _id, fields in entries]


def text_of(events) -> str:
    return "".join(e.text for e in events if isinstance(e, DeltaEvent))


def run_until_idle(worker: Worker, r, settings_, limit: int = 200) -> None:
    """Iterate until the worker holds nothing and its queue is empty."""
    worker.transport.setup()
    stream = KeySpace(settings_.key_prefix).requests(MODEL)
    for _ in range(limit):
        worker.run_once()
        idle = not worker.in_flight and not worker.engine.has_unfinished()
        if idle and r.xlen(stream) == 0:
            return
    raise AssertionError("worker did not finish")


async def test_many_requests_are_answered_exactly_once(client, settings_):
    thread = WorkerThread(make_worker(settings_, engine=FakeEngine(max_batch_size=3)))
    thread.start()
    try:
        requests = [make_request(f"question {i}", max_tokens=4 + i % 3) for i in range(10)]

        async def ask(request):
            return [e async for e in client.submit(request)]

        results = await asyncio.wait_for(asyncio.gather(*(ask(q) for q in requests)), 20)
    finally:
        thread.stop()
    for request, events in zip(requests, results, strict=True):
        assert isinstance(events[0], StartEvent)
        assert text_of(events) == fake_answer(request)
        assert events[-1] == DoneEvent(finish_reason=FinishReason.LENGTH, usage=events[-1].usage)
        assert sum(isinstance(e, DoneEvent | ErrorEvent) for e in events) == 1


def test_cancel_frees_the_slot_within_one_step(r, settings_):
    engine = FakeEngine(max_batch_size=1)
    worker = make_worker(settings_, engine=engine, prefetch=0)
    worker.transport.setup()
    long_one, next_one = make_request("long", max_tokens=1000), make_request("next", max_tokens=2)
    enqueue(r, settings_, long_one)
    enqueue(r, settings_, next_one)
    for _ in range(3):
        worker.run_once()
    assert engine.stats().running == 1
    r.set(KeySpace(settings_.key_prefix).cancel(long_one.request_id), b"1")
    worker.run_once()
    events = reply(r, settings_, long_one.request_id)
    assert events[-1].finish_reason == FinishReason.CANCELLED
    assert engine.stats().running == 0
    # The freed slot goes to the next request at the next iteration.
    worker.run_once()
    assert engine.stats().running == 1 and engine.added[-1] == next_one.request_id
    assert isinstance(reply(r, settings_, next_one.request_id)[0], StartEvent)


def test_with_prefetch_the_next_request_waits_in_the_engine_and_takes_a_freed_slot_at_once(
    r, settings_
):
    engine = FakeEngine(max_batch_size=1)
    worker = make_worker(settings_, engine=engine, prefetch=1)
    worker.transport.setup()
    long_one, next_one, third = (
        make_request("long", max_tokens=1000),
        make_request("next", max_tokens=2),
        make_request("third", max_tokens=2),
    )
    for request in (long_one, next_one, third):
        enqueue(r, settings_, request)
    for _ in range(3):
        worker.run_once()
    # One running, one prefetched into the engine's queue, the third left in the broker.
    assert engine.stats().running == 1
    assert engine.added == [long_one.request_id, next_one.request_id]
    r.set(KeySpace(settings_.key_prefix).cancel(long_one.request_id), b"1")
    worker.run_once()
    assert reply(r, settings_, long_one.request_id)[-1].finish_reason == FinishReason.CANCELLED
    # The freed slot went to the prefetched request in the same step, not a fetch later.
    assert engine.stats().running == 1
    assert isinstance(reply(r, settings_, next_one.request_id)[0], StartEvent)


def test_bad_requests_become_error_events_and_the_worker_goes_on(r, settings_):
    worker = make_worker(settings_, max_request_age_s=60)
    data = b"image"
    stored = ImageRef(sha256=hashlib.sha256(data).hexdigest(), width=1, height=1)
    r.set(KeySpace(settings_.key_prefix).blob("tenant-a", stored.sha256), data)
    missing = ImageRef(sha256="ab" * 32, width=1, height=1)
    cases = {
        "missing_image": make_request("look", image_refs=[stored, missing]),
        "expired": make_request("late", deadline=time.time() - 1),
        "abandoned": msgspec.structs.replace(make_request("old"), created_at=time.time() - 61),
        "failing": make_request("FAIL_REQUEST please"),
        "good": make_request("fine thanks", image_refs=[stored]),
    }
    for request in cases.values():
        enqueue(r, settings_, request)
    r.xadd(KeySpace(settings_.key_prefix).requests(MODEL), {REQUEST_FIELD: b"not msgpack"})
    run_until_idle(worker, r, settings_)
    last = {name: reply(r, settings_, q.request_id)[-1] for name, q in cases.items()}
    assert last["missing_image"].code == ErrorCode.IMAGE_UNAVAILABLE
    assert last["expired"].code == ErrorCode.TIMEOUT
    assert last["abandoned"].code == ErrorCode.TIMEOUT
    assert last["failing"].code == ErrorCode.INVALID_REQUEST
    assert isinstance(last["good"], DoneEvent)
    assert text_of(reply(r, settings_, cases["good"].request_id)) == fake_answer(cases["good"])
    assert r.xlen(KeySpace(settings_.key_prefix).requests(MODEL)) == 0  # all acknowledged


def test_a_step_that_raises_fails_its_batch_only(r, settings_):
    worker = make_worker(settings_)
    boom, other = make_request("RAISE_IN_STEP", max_tokens=50), make_request("calm", max_tokens=50)
    enqueue(r, settings_, boom)
    enqueue(r, settings_, other)
    run_until_idle(worker, r, settings_)
    for request in (boom, other):
        assert reply(r, settings_, request.request_id)[-1].code == ErrorCode.INTERNAL_ERROR
    after = make_request("after the failure")
    enqueue(r, settings_, after)
    run_until_idle(worker, r, settings_)
    assert text_of(reply(r, settings_, after.request_id)) == fake_answer(after)


class _LeakyEngine(FakeEngine):
    """Fails the way a real runner can: an exception whose text names internals."""

    secret = "req_0ther tenant 42 at /srv/models/glm cuda:3"

    def add_request(self, request, images) -> None:
        if "BREAK_ADMISSION" in text_of_request(request):
            raise RuntimeError(f"loader crashed for {self.secret}")
        super().add_request(request, images)

    def step(self):
        if any(
            "BREAK_STEP" in text_of_request(seq.request) and rid not in self._aborted
            for rid, seq in self._running.items()
        ):
            raise ValueError(f"chunk 0..9 outside a slot of 8 for {self.secret}")
        return super().step()


def text_of_request(request) -> str:
    return " ".join(p.text for m in request.messages for p in m.content if hasattr(p, "text"))


def test_a_failure_of_ours_tells_clients_nothing_of_the_exception(r, settings_):
    """A failing step fails every request of its batch (other tenants' too) and a failing
    admission its own request: they get a fixed message and a server-error code, never the
    exception's text, and a step's ValueError is not blamed on the clients (400)."""
    worker = make_worker(settings_, engine=_LeakyEngine())
    breaker = make_request("BREAK_STEP now", max_tokens=50)
    bystander = make_request("calm", max_tokens=50)
    for request in (breaker, bystander):
        enqueue(r, settings_, request)
    run_until_idle(worker, r, settings_)
    admission = make_request("BREAK_ADMISSION please")
    enqueue(r, settings_, admission)
    run_until_idle(worker, r, settings_)

    for request in (breaker, bystander, admission):
        error = reply(r, settings_, request.request_id)[-1]
        assert isinstance(error, ErrorEvent), request
        assert error.code == ErrorCode.INTERNAL_ERROR
        assert _LeakyEngine.secret not in error.message
        assert "0ther" not in error.message and "/srv" not in error.message


class _WordyEngine(FakeEngine):
    """Reports failures in its own words, as an engine may: exception text in an error that
    is ours, a specific message in one the request caused, a ValueError from admission."""

    def add_request(self, request, images) -> None:
        if "BAD_VALUE" in text_of_request(request):
            raise ValueError(f"pixel tensor of shape (3, 0) for {_LeakyEngine.secret}")
        super().add_request(request, images)
        if "ENGINE_FAILS" in text_of_request(request):
            leak = f"decode failed: CUDA error on {_LeakyEngine.secret}"
            self._waiting[-1].error = ErrorEvent(ErrorCode.INTERNAL_ERROR, leak, retryable=True)


def test_clients_get_each_codes_fixed_message_and_the_log_gets_the_rest(r, settings_, caplog):
    worker = make_worker(settings_, engine=_WordyEngine())
    ours = make_request("ENGINE_FAILS now")
    quiet = make_request("ENGINE_FAILS quietly", stream=False)
    bad_value = make_request("BAD_VALUE here")
    theirs = make_request("FAIL_REQUEST please")
    for request in (ours, quiet, bad_value, theirs):
        enqueue(r, settings_, request)
    run_until_idle(worker, r, settings_)

    last = {q.request_id: reply(r, settings_, q.request_id)[-1] for q in (ours, quiet, bad_value)}
    for request in (ours, quiet):
        assert last[request.request_id] == ErrorEvent.fixed(
            ErrorCode.INTERNAL_ERROR, retryable=True
        )
    assert last[bad_value.request_id] == ErrorEvent.fixed(ErrorCode.INVALID_REQUEST)
    # The engine's specific message about the client's own request is for the client.
    assert reply(r, settings_, theirs.request_id)[-1] == ErrorEvent(
        ErrorCode.INVALID_REQUEST, "this request fails"
    )
    assert "decode failed: CUDA error" in caplog.text and "pixel tensor" in caplog.text


def test_a_non_streamed_reply_is_written_only_when_finished(r, settings_):
    worker = make_worker(settings_)
    worker.transport.setup()
    request = make_request("quiet please", max_tokens=6, stream=False)
    enqueue(r, settings_, request)
    for _ in range(4):
        worker.run_once()
    assert reply(r, settings_, request.request_id) == []
    run_until_idle(worker, r, settings_)
    events = reply(r, settings_, request.request_id)
    assert [type(e) for e in events] == [StartEvent, DeltaEvent, DoneEvent]
    assert events[1].text == fake_answer(request) and events[1].tokens == 6


def _orphan(r, settings_, request, *, streamed_events=()):
    """Make ``request`` pending to a worker that died (no heartbeat), idle long enough."""
    dead = RedisWorkerTransport.from_url(
        settings_.redis_url, settings=settings_, model=MODEL, worker_id="dead"
    )
    dead.setup()
    enqueue(r, settings_, request)
    assert [d.request for d in dead.fetch(1, 0)] == [request]
    if streamed_events:
        dead.publish([Outgoing(request.request_id, list(streamed_events))])
    time.sleep(settings_.claim_idle_ms / 1000 + 0.1)


def test_reclaimed_requests_retry_silently_or_fail_cleanly(r, settings_):
    quiet = make_request("not streamed", stream=False, max_tokens=3)
    started = make_request("only started", max_tokens=3)
    spoken = make_request("already talking", max_tokens=10)
    _orphan(r, settings_, quiet)
    _orphan(r, settings_, started, streamed_events=[StartEvent(prompt_tokens=2)])
    _orphan(
        r,
        settings_,
        spoken,
        streamed_events=[StartEvent(prompt_tokens=2), DeltaEvent(text="already ", tokens=1)],
    )
    run_until_idle(make_worker(settings_, "rescuer"), r, settings_)
    assert text_of(reply(r, settings_, quiet.request_id)) == fake_answer(quiet)
    started_events = reply(r, settings_, started.request_id)
    assert [type(e) for e in started_events].count(StartEvent) == 1  # no second start
    assert text_of(started_events) == fake_answer(started)
    spoken_events = reply(r, settings_, spoken.request_id)
    assert text_of(spoken_events) == "already "  # nothing duplicated
    assert spoken_events[-1] == ErrorEvent(
        ErrorCode.WORKER_LOST, spoken_events[-1].message, retryable=False
    )
    assert r.xlen(KeySpace(settings_.key_prefix).requests(MODEL)) == 0


def test_a_poison_request_is_given_up_after_max_deliveries(r, settings_):
    request = make_request("poison", max_tokens=3)
    _orphan(r, settings_, request)
    stream = KeySpace(settings_.key_prefix).requests(MODEL)
    # Two more deaths: claimed by workers that then die too.
    for name in ("dead2", "dead3"):
        t = RedisWorkerTransport.from_url(
            settings_.redis_url, settings=settings_, model=MODEL, worker_id=name
        )
        assert t.claim_stale() == []  # the dead one first seen gone: not before the grace
        time.sleep(settings_.presence_grace_s + 0.05)
        assert len(t.claim_stale()) == 1
        time.sleep(settings_.claim_idle_ms / 1000 + 0.1)
    run_until_idle(make_worker(settings_, "rescuer", max_deliveries=3), r, settings_)
    events = reply(r, settings_, request.request_id)
    # Each takeover told the client (a notice), the last one gave up.
    assert [type(e) for e in events] == [NoticeEvent, NoticeEvent, ErrorEvent]
    assert events[-1].code == ErrorCode.INTERNAL_ERROR and "giving up" in events[-1].message
    assert r.xlen(stream) == 0


def test_stop_finishes_the_running_batch_then_returns(r, settings_):
    engine = FakeEngine(max_batch_size=2, step_delay_s=0.01)
    worker = make_worker(settings_, engine=engine)
    running = [make_request(f"run {i}", max_tokens=30) for i in range(2)]
    for request in running:
        enqueue(r, settings_, request)
    thread = WorkerThread(worker)
    thread.start()
    deadline = time.time() + 5
    while engine.stats().running < 2 and time.time() < deadline:
        time.sleep(0.01)
    late = make_request("too late")
    enqueue(r, settings_, late)
    thread.stop()
    for request in running:
        assert text_of(reply(r, settings_, request.request_id)) == fake_answer(request)
    assert reply(r, settings_, late.request_id) == []  # left queued for another worker
    assert r.xlen(KeySpace(settings_.key_prefix).requests(MODEL)) == 1
    assert not r.exists(KeySpace(settings_.key_prefix).heartbeat(MODEL, "w1"))


def test_worker_survives_a_redis_outage_without_losing_events(settings_, monkeypatch):
    worker = make_worker(settings_)
    r = redis.Redis.from_url(settings_.redis_url)
    request = make_request("flaky broker", max_tokens=5)
    enqueue(r, settings_, request)
    worker.transport.setup()
    worker.run_once()
    real_publish = worker.transport.publish
    fail = threading.Event()
    fail.set()

    def flaky(batch):
        if fail.is_set():
            fail.clear()
            raise TransportUnavailable("down")
        real_publish(batch)

    monkeypatch.setattr(worker.transport, "publish", flaky)
    with pytest.raises(TransportUnavailable):
        worker.run_once()
    run_until_idle(worker, r, settings_)
    assert text_of(reply(r, settings_, request.request_id)) == fake_answer(request)
