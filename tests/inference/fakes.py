"""A fake engine with the real ``inference.engine.Engine`` interface, for worker/transport tests.

``FakeEngine`` admits up to ``max_batch_size`` requests, emits a ``StartEvent`` on
admission, then one token per step: the words of the last user text, then ``t0``, ``t1``...
until ``max_tokens`` (``FinishReason.LENGTH``). ``fake_answer`` computes that text.
Magic words in the prompt trigger failures: ``RAISE_IN_STEP`` makes ``step`` raise,
``FAIL_REQUEST`` makes the request end with an ``ErrorEvent``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from inference.engine.config import EngineStats
from inference.protocol import (
    DeltaEvent,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    Event,
    FinishReason,
    InferenceRequest,
    Message,
    SamplingParams,
    StartEvent,
    TextPart,
    Usage,
    WorkerHeartbeat,
    new_request_id,
)


def _prompt_words(request: InferenceRequest) -> list[str]:
    texts = [p.text for m in request.messages for p in m.content if isinstance(p, TextPart)]
    return " ".join(texts).split()


def fake_tokens(request: InferenceRequest) -> list[str]:
    words = _prompt_words(request)
    n = request.sampling.max_tokens
    tokens = [f"{w} " for w in words][:n]
    tokens += [f"t{i} " for i in range(n - len(tokens))]
    return tokens


def fake_answer(request: InferenceRequest) -> str:
    return "".join(fake_tokens(request))


def make_request(
    text: str = "hello world",
    *,
    model: str = "fake",
    tenant_id: str = "tenant-a",
    max_tokens: int = 5,
    stream: bool = True,
    deadline: float | None = None,
    image_refs: list | None = None,
) -> InferenceRequest:
    from inference.protocol import ImagePart

    content: list = [ImagePart(image=ref) for ref in image_refs or []]
    content.append(TextPart(text=text))
    return InferenceRequest(
        request_id=new_request_id(),
        tenant_id=tenant_id,
        model=model,
        messages=[Message(role="user", content=content)],
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0),
        stream=stream,
        deadline=deadline,
    )


@dataclass
class _Seq:
    request: InferenceRequest
    tokens: list[str]
    generated: int = 0
    error: ErrorEvent | None = None


@dataclass
class FakeEngine:
    max_batch_size: int = 4
    step_delay_s: float = 0.0
    _waiting: list[_Seq] = field(default_factory=list)
    _running: dict[str, _Seq] = field(default_factory=dict)
    _aborted: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    steps: int = 0
    added: list[str] = field(default_factory=list)

    def add_request(self, request: InferenceRequest, images: Mapping[str, bytes]) -> None:
        with self._lock:
            rid = request.request_id
            if rid in self._running or any(s.request.request_id == rid for s in self._waiting):
                raise ValueError(f"duplicate request id {rid}")
            seq = _Seq(request=request, tokens=fake_tokens(request))
            missing = [r.sha256 for r in request.image_refs() if r.sha256 not in images]
            if missing:
                seq.error = ErrorEvent(ErrorCode.IMAGE_UNAVAILABLE, f"missing {missing[0]}")
            elif "FAIL_REQUEST" in _prompt_words(request):
                seq.error = ErrorEvent(ErrorCode.INVALID_REQUEST, "this request fails")
            self._waiting.append(seq)
            self.added.append(rid)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborted.add(request_id)

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running)

    def step(self) -> list[tuple[str, Event]]:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        with self._lock:
            self.steps += 1
            out: list[tuple[str, Event]] = []
            for seq in [*self._waiting, *self._running.values()]:
                rid = seq.request.request_id
                if rid in self._aborted:
                    self._drop(rid)
                    usage = Usage(prompt_tokens=1, completion_tokens=seq.generated)
                    out.append((rid, DoneEvent(finish_reason=FinishReason.CANCELLED, usage=usage)))
            self._aborted.clear()
            if any("RAISE_IN_STEP" in _prompt_words(s.request) for s in self._running.values()):
                raise RuntimeError("fake engine step failure")
            while self._waiting and len(self._running) < self.max_batch_size:
                seq = self._waiting.pop(0)
                rid = seq.request.request_id
                if seq.error is not None:
                    out.append((rid, seq.error))
                    continue
                self._running[rid] = seq
                out.append((rid, StartEvent(prompt_tokens=len(_prompt_words(seq.request)))))
            for rid, seq in list(self._running.items()):
                out.append((rid, DeltaEvent(text=seq.tokens[seq.generated], tokens=1)))
                seq.generated += 1
                if seq.generated >= len(seq.tokens):
                    del self._running[rid]
                    usage = Usage(prompt_tokens=1, completion_tokens=seq.generated)
                    out.append((rid, DoneEvent(finish_reason=FinishReason.LENGTH, usage=usage)))
            return out

    def _drop(self, rid: str) -> None:
        self._running.pop(rid, None)
        self._waiting = [s for s in self._waiting if s.request.request_id != rid]

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                running=len(self._running),
                waiting=len(self._waiting),
                max_batch_size=self.max_batch_size,
                kv_used_tokens=sum(s.generated for s in self._running.values()),
                kv_capacity_tokens=4096,
                tokens_per_second=0.0,
                device="cpu",
                memory_bytes=0,
            )


# --- transport tests without an engine ----------------------------------------------------

# A whole reply as a worker writes it: start, twenty deltas, done.
SAMPLE_EVENTS: list[Event] = [
    StartEvent(prompt_tokens=3),
    *[DeltaEvent(text=f"w{i} ", tokens=1) for i in range(20)],
    DoneEvent(finish_reason=FinishReason.STOP, usage=Usage(prompt_tokens=3, completion_tokens=20)),
]


def make_heartbeat(
    worker_id: str, *, model: str = "fake", running: int = 0, waiting: int = 0
) -> WorkerHeartbeat:
    """A fresh heartbeat of a worker with 4 batch slots."""
    now = time.time()
    return WorkerHeartbeat(
        worker_id=worker_id,
        model=model,
        running=running,
        waiting=waiting,
        max_batch_size=4,
        kv_used_tokens=0,
        kv_capacity_tokens=100,
        tokens_per_second=1.0,
        memory_bytes=0,
        device="cpu",
        started_at=now,
        updated_at=now,
    )


# --- helpers for tests against the real Redis --------------------------------------------


def redis_url_for_tests() -> str | None:
    """The Redis the suite may use (``REDIS_URL``), or None when unset/unreachable."""
    import os

    import redis

    url = os.environ.get("REDIS_URL", "")
    if not url:
        return None
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.RedisError:
        return None
    return url


def unique_prefix() -> str:
    import uuid

    return f"test-inf-{uuid.uuid4().hex[:10]}"


def delete_prefix(url: str, prefix: str) -> None:
    """Delete only this test's keys (never FLUSHDB: others share the database)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    finally:
        client.close()


class WorkerThread(threading.Thread):
    """Runs ``Worker.run`` in a thread until ``stop()`` (tests of the worker loop)."""

    def __init__(self, worker) -> None:
        super().__init__(daemon=True)
        self.worker = worker
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.worker.run(self.stop_event)
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        self.join(timeout)
        assert not self.is_alive(), "worker did not stop"
        if self.error is not None:
            raise self.error
