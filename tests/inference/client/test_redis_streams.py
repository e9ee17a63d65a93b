"""The Redis Streams client (inference/client/redis_streams.py) against the real Redis, with
the worker half (inference/worker/redis_streams.py) as its counterpart; no engine."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time

import pytest
import redis

from inference.client.blobs import BlobDigestMismatch
from inference.client.redis_streams import _LIVENESS_LUA, RedisStreamsClient
from inference.protocol import (
    REQUEST_FIELD,
    ErrorCode,
    ErrorEvent,
    ImageRef,
    KeySpace,
    StartEvent,
    encode,
)
from inference.settings import InferenceSettings
from inference.worker.redis_streams import RedisWorkerTransport
from inference.worker.transport import Outgoing
from tests.inference.fakes import (
    SAMPLE_EVENTS,
    make_heartbeat,
    make_request,
)

pytestmark = pytest.mark.redis

MODEL = "fake"
_LIVENESS_SHA = hashlib.sha1(_LIVENESS_LUA.encode()).hexdigest().encode()


@pytest.fixture
def settings_(redis_settings):
    # every model_health reads Redis (the health cache has its own test)
    return redis_settings(
        claim_idle_ms=200, heartbeat_s=0.5, request_timeout_s=5.0, health_cache_s=0.0
    )


@pytest.fixture
async def client(settings_: InferenceSettings):
    c = RedisStreamsClient(settings=settings_)
    yield c
    await c.aclose()


def _transport(settings_: InferenceSettings, worker_id: str) -> RedisWorkerTransport:
    t = RedisWorkerTransport.from_url(
        settings_.redis_url, settings=settings_, model=MODEL, worker_id=worker_id
    )
    t.setup()
    return t


async def _collect(agen) -> list:
    return [event async for event in agen]


async def test_request_and_events_round_trip_through_the_streams(client, settings_):
    request = make_request("round trip", stream=True)
    worker = _transport(settings_, "w1")
    consumer = asyncio.create_task(_collect(client.submit(request)))
    deliveries = []
    for _ in range(50):
        deliveries = await asyncio.to_thread(worker.fetch, 4, 100)
        if deliveries:
            break
    assert [d.request for d in deliveries] == [request]
    assert deliveries[0].attempt == 1
    worker.publish([Outgoing(request.request_id, SAMPLE_EVENTS, ack_token=deliveries[0].token)])
    assert await asyncio.wait_for(consumer, 5) == SAMPLE_EVENTS
    # Acknowledged and deleted: the request stream holds only unfinished work.
    r = redis.Redis.from_url(settings_.redis_url)
    stream = KeySpace(settings_.key_prefix).requests(MODEL)
    assert r.xlen(stream) == 0
    assert r.xpending(stream, "workers")["pending"] == 0
    assert 0 < r.ttl(KeySpace(settings_.key_prefix).reply(request.request_id)) <= 300


async def test_late_reader_of_a_finished_reply_misses_nothing(client, settings_):
    request_id = "req_late"
    _transport(settings_, "w1").publish([Outgoing(request_id, SAMPLE_EVENTS)])
    assert await _collect(client.events(request_id, time_limit_s=5)) == SAMPLE_EVENTS


async def test_reader_joining_halfway_while_the_worker_writes_misses_nothing(client, settings_):
    request_id = "req_halfway"
    worker = _transport(settings_, "w1")
    half_written = threading.Event()

    def write() -> None:
        for i, event in enumerate(SAMPLE_EVENTS):
            worker.publish([Outgoing(request_id, [event])])
            if i == len(SAMPLE_EVENTS) // 2:
                half_written.set()
            time.sleep(0.01)

    writer = threading.Thread(target=write)
    writer.start()
    await asyncio.to_thread(half_written.wait, 5)
    assert await _collect(client.events(request_id, time_limit_s=5)) == SAMPLE_EVENTS
    writer.join()


async def test_reader_times_out_with_an_error_event(client):
    events = await _collect(client.events("req_never", time_limit_s=0.3))
    assert len(events) == 1
    assert isinstance(events[0], ErrorEvent) and events[0].code == ErrorCode.TIMEOUT


async def test_leaving_submit_early_marks_the_request_cancelled(client, settings_):
    request = make_request("bye")
    worker = _transport(settings_, "w1")
    agen = client.submit(request)
    task = asyncio.create_task(agen.__anext__())
    await asyncio.sleep(0.2)  # enqueued, waiting for the first event
    worker.publish([Outgoing(request.request_id, [StartEvent(prompt_tokens=1)])])
    assert isinstance(await task, StartEvent)
    await agen.aclose()
    assert worker.cancelled([request.request_id, "req_other"]) == {request.request_id}


async def test_unknown_model_is_an_error_event(client):
    events = await _collect(client.submit(make_request(model="nope")))
    assert [type(e) for e in events] == [ErrorEvent]
    assert events[0].code == ErrorCode.MODEL_NOT_FOUND


async def _submit_and_take(client, worker, request):
    """Submit ``request`` and return the worker's delivery of it (the stream left open)."""
    consumer = asyncio.create_task(_collect(client.submit(request)))
    for _ in range(50):
        deliveries = await asyncio.to_thread(worker.fetch, 4, 100)
        if deliveries:
            return consumer, deliveries[0]
    raise AssertionError("the request never reached the worker")


async def test_images_travel_with_the_enqueue_once_per_tenant_and_refresh_their_ttl(
    client, settings_
):
    data = b"\x89PNG fake image bytes"
    ref = ImageRef(sha256=hashlib.sha256(data).hexdigest(), width=1, height=1)
    r = redis.Redis.from_url(settings_.redis_url)
    key = KeySpace(settings_.key_prefix).blob("tA", ref.sha256)
    await client.put_image(tenant_id="tA", data=data, ref=ref)
    assert not r.exists(key)  # staged in the web process until its request is enqueued
    worker = _transport(settings_, "w1")

    first = make_request("one", tenant_id="tA", image_refs=[ref])
    consumer, delivery = await _submit_and_take(client, worker, first)
    assert worker.fetch_images("tA", [ref.sha256, "0" * 64]) == {ref.sha256: data}
    assert worker.fetch_images("tB", [ref.sha256]) == {}  # another tenant cannot name it
    worker.publish([Outgoing(first.request_id, SAMPLE_EVENTS, ack_token=delivery.token)])
    await asyncio.wait_for(consumer, 5)

    r.expire(key, 5)
    await client.put_image(tenant_id="tA", data=data, ref=ref)
    second = make_request("two", tenant_id="tA", image_refs=[ref])
    consumer, delivery = await _submit_and_take(client, worker, second)
    assert r.ttl(key) > 5  # refreshed to the blob TTL by the new request
    worker.publish([Outgoing(second.request_id, SAMPLE_EVENTS, ack_token=delivery.token)])
    await asyncio.wait_for(consumer, 5)
    assert len(client._staged) == 0  # released by the requests that staged it

    with pytest.raises(BlobDigestMismatch):
        await client.put_image(tenant_id="tA", data=b"other bytes", ref=ref)


class _RoundTrips:
    """Counts what redis-py sends: one send per command or pipeline, i.e. per round trip."""

    def __init__(self, monkeypatch) -> None:
        import redis.asyncio.connection as aconnection

        self.count = 0
        original = aconnection.AbstractConnection.send_packed_command

        async def counted(conn, command, check_health=True):
            packed = b"".join(command) if isinstance(command, list) else command
            # The waiting reader's blocking reads of the reply stream, and its look at the
            # workers' states after a wait with nothing new, are not part of the request's
            # way to a worker (how many there are depends on how soon the worker looks).
            if _LIVENESS_SHA not in packed and b"XREAD" not in packed:
                self.count += 1
            return await original(conn, command, check_health)

        monkeypatch.setattr(aconnection.AbstractConnection, "send_packed_command", counted)


async def test_an_enqueue_with_images_is_one_round_trip(client, settings_, monkeypatch):
    worker = _transport(settings_, "w1")
    images = [b"\x89PNG first", b"\x89PNG second"]
    refs = [ImageRef(sha256=hashlib.sha256(d).hexdigest(), width=1, height=1) for d in images]
    request = make_request("two images", tenant_id="tA", image_refs=refs)
    await client.model_health(MODEL)  # opens the connections and loads nothing else
    trips = _RoundTrips(monkeypatch)
    for data, ref in zip(images, refs, strict=True):
        await client.put_image(tenant_id="tA", data=data, ref=ref)
    assert trips.count == 0  # staged, not sent
    agen = client.submit(request)
    reader = asyncio.create_task(agen.__anext__())  # enqueues, then blocks on the reply
    for _ in range(50):
        deliveries = await asyncio.to_thread(worker.fetch, 4, 100)
        if deliveries:
            break
    sent_before_the_worker_saw_it = trips.count
    assert [d.request.request_id for d in deliveries] == [request.request_id]
    assert worker.fetch_images("tA", [r.sha256 for r in refs]) == {
        ref.sha256: data for ref, data in zip(refs, images, strict=True)
    }
    # The enqueue pipeline: the blobs' SETs, then the script (marker + XADD).
    assert sent_before_the_worker_saw_it == 1
    worker.publish([Outgoing(request.request_id, SAMPLE_EVENTS, ack_token=deliveries[0].token)])
    await asyncio.wait_for(reader, 5)
    await agen.aclose()


async def test_an_enqueue_sent_twice_with_its_images_adds_the_request_once(client, settings_):
    """What redis-py's retry after a lost reply does: the whole pipeline again."""
    data = b"\x89PNG retried"
    ref = ImageRef(sha256=hashlib.sha256(data).hexdigest(), width=1, height=1)
    request = make_request("retried", tenant_id="tA", image_refs=[ref])
    keys = KeySpace(settings_.key_prefix)
    r = redis.Redis.from_url(settings_.redis_url)
    for _ in range(2):
        await client.put_image(tenant_id="tA", data=data, ref=ref)
        await client._enqueue(request, 30.0)
    assert r.xlen(keys.requests(MODEL)) == 1
    assert r.get(keys.blob("tA", ref.sha256)) == data
    assert 0 < r.ttl(keys.blob("tA", ref.sha256)) <= settings_.blob_ttl_s


async def test_model_health_is_one_round_trip_and_reused_briefly(settings_, monkeypatch):
    import dataclasses

    client = RedisStreamsClient(settings=dataclasses.replace(settings_, health_cache_s=60.0))
    try:
        w1 = _transport(settings_, "w1")
        w1.heartbeat(make_heartbeat("w1", running=1))
        await client.model_health("other")  # opens the connection
        trips = _RoundTrips(monkeypatch)
        assert (await client.model_health(MODEL)).live_workers == 1
        assert trips.count == 1
        w1.unregister()
        # Within health_cache_s the answer is reused: no round trip, the old answer.
        assert (await client.model_health(MODEL)).live_workers == 1
        assert trips.count == 1
    finally:
        await client.aclose()


async def test_model_health_counts_live_workers_and_queue(client, settings_):
    w1, w2 = _transport(settings_, "w1"), _transport(settings_, "w2")
    w1.heartbeat(make_heartbeat("w1", running=2, waiting=1))
    w2.heartbeat(make_heartbeat("w2", running=1))
    r = redis.Redis.from_url(settings_.redis_url)
    for _ in range(3):
        r.xadd(
            KeySpace(settings_.key_prefix).requests(MODEL), {REQUEST_FIELD: encode(make_request())}
        )
    health = await client.model_health(MODEL)
    assert (health.live_workers, health.running, health.capacity) == (2, 3, 8)
    assert (health.waiting, health.pending, health.queue_depth) == (3, 0, 4)
    w1.fetch(2, 0)
    health = await client.model_health(MODEL)
    assert (health.waiting, health.pending) == (1, 2)
    w2.unregister()
    assert (await client.model_health(MODEL)).live_workers == 1
    # A worker whose heartbeat expires stops counting; still connected (stuck, or late), it
    # stays registered until its connection closes too.
    r.delete(KeySpace(settings_.key_prefix).heartbeat(MODEL, "w1"))
    health = await client.model_health(MODEL)
    assert health.live_workers == 0 and not health.available
    assert r.zcard(KeySpace(settings_.key_prefix).registry(MODEL)) == 1
    w1.close()
    await client.model_health(MODEL)
    assert r.zcard(KeySpace(settings_.key_prefix).registry(MODEL)) == 0


async def test_a_worker_whose_connection_closes_is_not_live_while_its_heartbeat_lasts(
    client, settings_
):
    """A crash closes the worker's sockets: Redis drops its presence subscription at once,
    so the worker stops counting while its heartbeat key still has most of its TTL."""
    keys = KeySpace(settings_.key_prefix)
    w1, w2 = _transport(settings_, "w1"), _transport(settings_, "w2")
    w1.heartbeat(make_heartbeat("w1"))
    w2.heartbeat(make_heartbeat("w2"))
    assert (await client.model_health(MODEL)).live_workers == 2
    w1.close()  # what the kernel does to a SIGKILLed process's connections
    r = redis.Redis.from_url(settings_.redis_url)
    assert r.pttl(keys.heartbeat(MODEL, "w1")) > 0  # the key is still there
    health = await client.model_health(MODEL)
    assert health.live_workers == 1
    assert [b.worker_id for b in health.workers] == ["w2"]


async def test_model_health_of_a_model_nobody_serves(client):
    health = await client.model_health(MODEL)
    assert (health.live_workers, health.queue_depth, health.capacity) == (0, 0, 0)
