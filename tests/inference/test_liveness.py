"""``inference.protocol.worker_liveness``: one registered worker's state from its heartbeat
key and its presence subscription (the Redis side is in tests/inference/client and worker)."""

from __future__ import annotations

import msgspec
import pytest

from inference.protocol import (
    HeartbeatPresence,
    Liveness,
    decode_heartbeat_presence,
    encode_heartbeat,
    worker_liveness,
)
from tests.inference.fakes import make_heartbeat

_BEAT = msgspec.structs.replace(make_heartbeat("w"), presence=True)
_OLD_BEAT = make_heartbeat("w")  # a worker that holds no presence subscription


@pytest.mark.parametrize(
    ("beat", "subscribers", "state"),
    [
        (_BEAT, 1, Liveness.LIVE),
        (_BEAT, 0, Liveness.GONE),  # its connection closed while the key lasts: a crash
        (None, 1, Liveness.SILENT),  # connected, no heartbeat for a TTL: stuck or late
        (None, 0, Liveness.GONE),
        (_OLD_BEAT, 0, Liveness.LIVE),  # only its heartbeat can tell
    ],
)
def test_a_workers_state(beat, subscribers, state):
    assert worker_liveness(beat, subscribers) is state


def test_the_presence_field_is_read_alone_and_garbage_declares_none():
    assert decode_heartbeat_presence(encode_heartbeat(_BEAT)) == HeartbeatPresence(True)
    assert decode_heartbeat_presence(encode_heartbeat(_OLD_BEAT)) == HeartbeatPresence(False)
    garbage = decode_heartbeat_presence(b"\xc1 not msgpack")
    assert garbage == HeartbeatPresence(False)
    # A beat nobody can read still counts while its key lasts: only its expiry tells.
    assert worker_liveness(garbage, 0) is Liveness.LIVE
