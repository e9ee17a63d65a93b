"""The worker half of the Redis Streams transport (inference/worker/redis_streams.py)
against the real Redis: reclaiming a dead worker's requests. The rest of the round trip is
in tests/inference/client/test_redis_streams.py."""

from __future__ import annotations

import time

import pytest
import redis

from inference.protocol import (
    EVENT_FIELD,
    REQUEST_FIELD,
    TAKEN_OVER,
    KeySpace,
    NoticeEvent,
    decode_event,
    decode_request,
    encode,
)
from inference.settings import InferenceSettings
from inference.worker.redis_streams import RedisWorkerTransport
from inference.worker.transport import Outgoing, ReplyState, TransportUnavailable
from tests.inference.fakes import (
    SAMPLE_EVENTS,
    make_heartbeat,
    make_request,
)

pytestmark = pytest.mark.redis

MODEL = "fake"


@pytest.fixture
def settings_(redis_settings):
    return redis_settings(claim_idle_ms=200, heartbeat_s=0.5, request_timeout_s=5.0)


def _transport(settings_: InferenceSettings, worker_id: str) -> RedisWorkerTransport:
    t = RedisWorkerTransport.from_url(
        settings_.redis_url, settings=settings_, model=MODEL, worker_id=worker_id
    )
    t.setup()
    return t


def _live(settings_: InferenceSettings, worker_id: str) -> RedisWorkerTransport:
    """A worker that has sent its heartbeat (and holds its presence)."""
    worker = _transport(settings_, worker_id)
    worker.heartbeat(make_heartbeat(worker_id))
    return worker


def test_only_dead_workers_entries_are_reclaimed_with_their_reply_state(settings_):
    keys = KeySpace(settings_.key_prefix)
    r = redis.Redis.from_url(settings_.redis_url)
    dead, alive, rescuer = (_transport(settings_, w) for w in ("dead", "alive", "rescuer"))
    alive.heartbeat(make_heartbeat("alive"))
    rescuer.heartbeat(make_heartbeat("rescuer"))
    requests = {name: make_request(name) for name in ("empty", "started", "streamed", "done")}
    for request in requests.values():
        r.xadd(keys.requests(MODEL), {REQUEST_FIELD: encode(request)})
    taken = dead.fetch(4, 0)
    assert len(taken) == 4
    kept = make_request("kept")
    r.xadd(keys.requests(MODEL), {REQUEST_FIELD: encode(kept)})
    assert [d.request for d in alive.fetch(1, 0)] == [kept]
    dead.publish(
        [
            Outgoing(requests["started"].request_id, SAMPLE_EVENTS[:1]),
            Outgoing(requests["streamed"].request_id, SAMPLE_EVENTS[:3]),
            Outgoing(requests["done"].request_id, SAMPLE_EVENTS),
        ]
    )
    assert rescuer.claim_stale() == []  # not gone long enough yet
    time.sleep(settings_.presence_grace_s + 0.05)
    claimed = {d.request.request_id: d for d in rescuer.claim_stale()}
    assert set(claimed) == {r_.request_id for r_ in requests.values()}  # not the live one's
    states = {name: claimed[req.request_id].reply_state for name, req in requests.items()}
    assert states == {
        "empty": ReplyState.EMPTY,
        "started": ReplyState.STARTED,
        "streamed": ReplyState.STREAMED,
        "done": ReplyState.FINISHED,
    }
    assert all(d.attempt == 2 for d in claimed.values())
    assert (
        decode_request(encode(claimed[requests["empty"].request_id].request)) == requests["empty"]
    )
    # A second rescuer right after finds nothing: the claim reset the idle time.
    other = _live(settings_, "other")
    assert other.claim_stale() == []


def _stuck_with(settings_: InferenceSettings, worker_id: str, count: int) -> RedisWorkerTransport:
    """A worker with a heartbeat and ``count`` requests taken (pending, idle from now)."""
    r = redis.Redis.from_url(settings_.redis_url)
    worker = _transport(settings_, worker_id)
    worker.heartbeat(make_heartbeat(worker_id))
    for i in range(count):
        r.xadd(
            KeySpace(settings_.key_prefix).requests(MODEL),
            {REQUEST_FIELD: encode(make_request(f"{worker_id}-{i}"))},
        )
    assert len(worker.fetch(count, 0)) == count
    return worker


def test_a_worker_whose_connection_closed_is_claimed_after_the_grace_not_the_claim_timeout(
    redis_settings,
):
    """A crash closes the worker's connections: its requests are taken once it stayed gone
    presence_grace_s, though its heartbeat key lives on and the claim timeout is a minute."""
    settings_ = redis_settings(claim_idle_ms=60_000, heartbeat_s=0.1, request_timeout_s=5.0)
    rescuer = _live(settings_, "rescuer")
    victim = _stuck_with(settings_, "victim", 2)
    victim.close()  # what the kernel does to a SIGKILLed process's sockets
    assert (
        redis.Redis.from_url(settings_.redis_url).pttl(
            KeySpace(settings_.key_prefix).heartbeat(MODEL, "victim")
        )
        > 0
    )
    assert rescuer.claim_stale() == []  # first seen gone: not yet
    time.sleep(settings_.presence_grace_s + 0.05)
    assert len(rescuer.claim_stale()) == 2


def test_a_worker_that_lost_its_subscription_and_took_it_again_is_not_claimed(redis_settings):
    settings_ = redis_settings(claim_idle_ms=60_000, heartbeat_s=0.1, request_timeout_s=5.0)
    rescuer = _live(settings_, "rescuer")
    worker = _stuck_with(settings_, "blip", 1)
    assert worker._presence is not None
    worker._presence.close()  # the connection dropped; the process lives
    assert rescuer.claim_stale() == []
    worker.heartbeat(make_heartbeat("blip"))  # its next beat finds NUMSUB 0 and subscribes
    time.sleep(settings_.presence_grace_s + 0.05)
    assert rescuer.claim_stale() == []
    assert worker.fetch(1, 0) == []  # nothing was taken from it either way


def test_a_silent_worker_still_connected_waits_out_the_claim_timeout(redis_settings):
    """Connected but without heartbeat (an engine stuck, or a beat only late): its requests
    are taken only once idle claim_idle_ms."""
    settings_ = redis_settings(claim_idle_ms=800, heartbeat_s=0.1, request_timeout_s=5.0)
    rescuer = _live(settings_, "rescuer")
    silent = _stuck_with(settings_, "silent", 1)  # held: its connections stay open
    redis.Redis.from_url(settings_.redis_url).delete(
        KeySpace(settings_.key_prefix).heartbeat(MODEL, "silent")
    )
    time.sleep(settings_.presence_grace_s + 0.05)
    assert rescuer.claim_stale() == []  # presence held: not gone, only silent
    time.sleep(0.8)
    assert len(rescuer.claim_stale()) == 1
    silent.close()


def test_a_streamed_request_taken_over_tells_its_client_why(redis_settings):
    """The claimer appends a notice to the reply of each streamed request whose client saw
    no text yet; the notice does not count as text, so a second takeover still re-runs it."""
    settings_ = redis_settings(claim_idle_ms=60_000, heartbeat_s=0.1, request_timeout_s=5.0)
    keys = KeySpace(settings_.key_prefix)
    r = redis.Redis.from_url(settings_.redis_url)
    requests = {
        "empty": make_request("empty"),
        "started": make_request("started"),
        "whole": make_request("whole", stream=False),
    }
    for request in requests.values():
        r.xadd(keys.requests(MODEL), {REQUEST_FIELD: encode(request)})
    victim = _live(settings_, "victim")
    assert len(victim.fetch(3, 0)) == 3
    victim.publish([Outgoing(requests["started"].request_id, SAMPLE_EVENTS[:1])])
    victim.close()

    def replies() -> dict[str, list]:
        return {
            name: [decode_event(f[EVENT_FIELD]) for _i, f in r.xrange(keys.reply(req.request_id))]
            for name, req in requests.items()
        }

    def claimed_by(rescuer: RedisWorkerTransport) -> dict[str, ReplyState]:
        assert rescuer.claim_stale() == []  # gone, first seen
        time.sleep(settings_.presence_grace_s + 0.05)
        by_id = {d.request.request_id: d.reply_state for d in rescuer.claim_stale()}
        return {name: by_id[req.request_id] for name, req in requests.items()}

    first = _live(settings_, "first")
    assert claimed_by(first) == {
        "empty": ReplyState.EMPTY,
        "started": ReplyState.STARTED,
        "whole": ReplyState.EMPTY,
    }
    notice = NoticeEvent.fixed(TAKEN_OVER)
    assert replies() == {"empty": [notice], "started": [SAMPLE_EVENTS[0], notice], "whole": []}

    first.close()  # the rescuer dies too, before any text
    second = _live(settings_, "second")
    assert claimed_by(second) == {
        "empty": ReplyState.EMPTY,
        "started": ReplyState.STARTED,
        "whole": ReplyState.EMPTY,
    }
    assert replies()["empty"] == [notice, notice]


def test_a_claim_pass_that_fails_half_way_loses_nothing(redis_settings, monkeypatch):
    """Entries claimed by a pass that then met a broker error are this (live) worker's: no
    other worker would take them, so the next pass returns them; a notice that cannot be
    written does not stop the claim either."""
    settings_ = redis_settings(claim_idle_ms=60_000, heartbeat_s=0.1, request_timeout_s=5.0)
    rescuer = _live(settings_, "rescuer")
    victim = _stuck_with(settings_, "victim", 3)
    victim.close()
    assert rescuer.claim_stale() == []  # first seen gone
    time.sleep(settings_.presence_grace_s + 0.05)
    real_reply_state = rescuer._reply_state
    calls = 0

    def failing_on_the_second(request_id: str):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise redis.ConnectionError("connection reset (test)")
        return real_reply_state(request_id)

    monkeypatch.setattr(rescuer, "_reply_state", failing_on_the_second)
    with pytest.raises(TransportUnavailable):
        rescuer.claim_stale()  # all three XCLAIMed, none returned
    monkeypatch.setattr(rescuer, "_reply_state", real_reply_state)

    def publish_down(batch):
        raise TransportUnavailable("down (test)")

    monkeypatch.setattr(rescuer, "publish", publish_down)
    again = rescuer.claim_stale()

    assert len({d.request.request_id for d in again}) == 3
    assert all(d.attempt == 2 for d in again)  # the one claim counted, not the retake
    assert rescuer.claim_stale() == []  # returned once
