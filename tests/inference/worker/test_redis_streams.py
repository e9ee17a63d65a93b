"""The worker half of the Redis Streams transport (inference/worker/redis_streams.py)
against the real Redis: reclaiming a dead worker's requests. The rest of the round trip is
in tests/inference/client/test_redis_streams.py."""

from __future__ import annotations

import time

import pytest
import redis

from inference.protocol import REQUEST_FIELD, KeySpace, decode_request, encode
from inference.settings import InferenceSettings
from inference.worker.redis_streams import RedisWorkerTransport
from inference.worker.transport import Outgoing, ReplyState
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
    assert rescuer.claim_stale() == []  # not idle long enough yet
    time.sleep(0.3)
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
    other = _transport(settings_, "other")
    other.heartbeat(make_heartbeat("other"))
    assert other.claim_stale() == []
