"""The worker IO renews the engine's last heartbeat while the engine's thread is mid-step,
for a bounded time (inference/worker/io.py, docs/reliability.md "Liveness")."""

from __future__ import annotations

import time

import pytest

from inference.worker import io as worker_io
from inference.worker.io import WorkerIO
from tests.inference.fakes import make_heartbeat


class BeatRecorder:
    """The part of a transport that ``io_once(accept_new=False)`` uses with nothing held."""

    def __init__(self) -> None:
        self.beats: list[float] = []

    def heartbeat(self, beat: object) -> None:
        self.beats.append(time.monotonic())

    def publish(self, batch: object) -> None:
        raise AssertionError("nothing to publish")


def _io(recorder: BeatRecorder, renew_s: float) -> WorkerIO:
    return WorkerIO(
        transport=recorder,  # type: ignore[arg-type]
        max_batch_size=1,
        claim_interval_s=1.0,
        idle_block_ms=0,
        renew_heartbeat_s=renew_s,
    )


def _drive(io: WorkerIO, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        io.io_once(accept_new=False)
        time.sleep(0.005)


def test_the_last_beat_is_renewed_while_the_engine_builds_none() -> None:
    recorder = BeatRecorder()
    io = _io(recorder, renew_s=0.05)
    io.queue_heartbeat(make_heartbeat("w1"))  # then the engine's thread is busy
    _drive(io, 0.5)
    # One sent at once, then renewed every 0.05 s: about ten, and never two at once.
    assert 6 <= len(recorder.beats) <= 12, len(recorder.beats)
    gaps = [b - a for a, b in zip(recorder.beats, recorder.beats[1:], strict=False)]
    assert min(gaps) >= 0.045


def test_renewal_stops_when_the_engine_stays_silent_too_long(monkeypatch) -> None:
    monkeypatch.setattr(worker_io, "_RENEW_MAX_S", 0.2)
    recorder = BeatRecorder()
    io = _io(recorder, renew_s=0.02)
    io.queue_heartbeat(make_heartbeat("w1"))
    _drive(io, 0.5)
    last = recorder.beats[-1]
    assert last - recorder.beats[0] < 0.25  # a stuck engine: the key is left to expire
    io.queue_heartbeat(make_heartbeat("w1"))  # the engine is back
    _drive(io, 0.1)
    assert recorder.beats[-1] > last


@pytest.mark.parametrize("renew_s", [0.0])
def test_without_renewal_only_the_engines_beats_go_out(renew_s: float) -> None:
    recorder = BeatRecorder()
    io = _io(recorder, renew_s=renew_s)
    io.queue_heartbeat(make_heartbeat("w1"))
    _drive(io, 0.2)
    assert len(recorder.beats) == 1
