"""The worker loop around the engine: the idle gap between steps and the publish latency.

The real ``Worker`` (``inference/worker/loop.py``) and the real Redis transport, in this
process, around a fake engine whose step takes a fixed time (``--step-ms``, ``time.sleep``
as a GPU engine waiting on its device; ``--busy`` spins instead, holding the GIL) and gives
every running request one token per step. Two paths, in one run, alternating per round:

- ``old``: ``WorkerConfig(io_thread=False)``, one thread: between two steps it fetches new
  requests, reads cancel marks and publishes the step's events (the loop before
  ``inference/worker/io.py``);
- ``new``: ``WorkerConfig(io_thread=True)``, the default: the IO on its own thread.

For each stream count (``--streams``) it enqueues that many requests of ``--steps`` tokens
(streamed; the batch holds 256, so the loop also looks for new requests every step, as a
worker with free slots does) and measures, while all of them run:

- gap: from the end of one ``engine.step()`` to the start of the next (p50/p99, ms);
- publish: from the end of the step that produced a token to the return of the
  ``transport.publish`` that wrote it, that is when it is in its Redis stream (p50/p99, ms;
  one sample per token);
- Redis calls the engine's thread made per step (the loop's own thread), and steps/s.

The metrics observer (``WorkerMetrics``) is fed as in a worker process. It uses a Redis
database of its own (``--redis-url``, default db 11) which it flushes before and after
(``--keep-db``: delete only its own keys instead).

    .venv/bin/python benchmarks/worker_loop.py                       # 1, 32, 128 streams
    .venv/bin/python benchmarks/worker_loop.py --streams 128 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis

from inference.engine.config import EngineStats
from inference.protocol import (
    REQUEST_FIELD,
    DeltaEvent,
    DoneEvent,
    Event,
    FinishReason,
    InferenceRequest,
    KeySpace,
    Message,
    SamplingParams,
    StartEvent,
    TextPart,
    Usage,
    WorkerHeartbeat,
    encode,
    new_request_id,
)
from inference.settings import InferenceSettings
from inference.worker.loop import Worker, WorkerConfig
from inference.worker.metrics import WorkerMetrics
from inference.worker.redis_streams import RedisWorkerTransport
from inference.worker.transport import Delivery, Outgoing

MODEL = "bench"
BATCH = 256


class StepEngine:
    """``EngineLike``: each step takes ``step_s`` and gives each running request a token
    whose text is the step's number (so the publish side knows when it was produced)."""

    def __init__(self, step_s: float, *, busy: bool) -> None:
        self.step_s = step_s
        self.busy = busy
        self._running: dict[str, list[int]] = {}  # request id -> [generated, max_tokens]
        self._new: list[str] = []
        self._aborted: set[str] = set()
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.sizes: list[int] = []  # requests running in each step
        self.threads: set[int] = set()

    def add_request(self, request: InferenceRequest, images: Mapping[str, bytes]) -> None:
        self._running[request.request_id] = [0, request.sampling.max_tokens]
        self._new.append(request.request_id)

    def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._running)

    def step(self) -> list[tuple[str, Event]]:
        self.starts.append(time.perf_counter())
        self.threads.add(threading.get_ident())
        if self.busy:
            until = time.perf_counter() + self.step_s
            while time.perf_counter() < until:
                pass
        else:
            time.sleep(self.step_s)
        index = len(self.starts) - 1
        out: list[tuple[str, Event]] = []
        for rid in self._new:
            out.append((rid, StartEvent(prompt_tokens=1)))
        self._new = []
        self.sizes.append(len(self._running))
        for rid, progress in list(self._running.items()):
            if rid in self._aborted:
                del self._running[rid]
                done = DoneEvent(finish_reason=FinishReason.CANCELLED, usage=Usage())
                out.append((rid, done))
                continue
            progress[0] += 1
            out.append((rid, DeltaEvent(text=f"{index} ", tokens=1)))
            if progress[0] >= progress[1]:
                del self._running[rid]
                usage = Usage(prompt_tokens=1, completion_tokens=progress[0])
                out.append((rid, DoneEvent(finish_reason=FinishReason.LENGTH, usage=usage)))
        self._aborted.clear()
        self.ends.append(time.perf_counter())
        return out

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self._running),
            waiting=0,
            max_batch_size=BATCH,
            kv_used_tokens=0,
            kv_capacity_tokens=1,
            tokens_per_second=0.0,
            device="cpu",
            memory_bytes=0,
        )


@dataclass
class TimedTransport:
    """The Redis transport, noting each call's thread and when each token was written."""

    inner: RedisWorkerTransport
    engine: StepEngine
    supports_reclaim: bool = True
    calls: dict[int, int] = field(default_factory=dict)  # thread -> calls
    published: list[tuple[int, float]] = field(default_factory=list)  # (step, written at)

    def _note(self) -> None:
        ident = threading.get_ident()
        self.calls[ident] = self.calls.get(ident, 0) + 1

    def setup(self) -> None:
        self._note()
        self.inner.setup()

    def fetch(self, count: int, block_ms: int) -> list[Delivery]:
        self._note()
        return self.inner.fetch(count, block_ms)

    def claim_stale(self, *, include_own: bool = False) -> list[Delivery]:
        self._note()
        return self.inner.claim_stale(include_own=include_own)

    def fetch_images(self, tenant_id: str, sha256s: Sequence[str]) -> dict[str, bytes]:
        self._note()
        return self.inner.fetch_images(tenant_id, sha256s)

    def cancelled(self, request_ids: Sequence[str]) -> set[str]:
        self._note()
        return self.inner.cancelled(request_ids)

    def publish(self, batch: Sequence[Outgoing]) -> None:
        self._note()
        self.inner.publish(batch)
        written = time.perf_counter()
        for out in batch:
            for event in out.events:
                if isinstance(event, DeltaEvent):
                    self.published.append((int(event.text), written))

    def heartbeat(self, beat: WorkerHeartbeat) -> None:
        self._note()
        self.inner.heartbeat(beat)

    def unregister(self) -> None:
        self._note()
        self.inner.unregister()


def _request(tokens: int) -> InferenceRequest:
    return InferenceRequest(
        request_id=new_request_id(),
        tenant_id="bench",
        model=MODEL,
        messages=[Message(role="user", content=[TextPart(text="hello")])],
        sampling=SamplingParams(max_tokens=tokens, temperature=0.0),
        stream=True,
    )


def _percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def run_once(
    url: str,
    *,
    streams: int,
    steps: int,
    step_s: float,
    busy: bool,
    io_thread: bool,
    metrics: bool = True,
) -> dict[str, Any]:
    """One worker, ``streams`` requests of ``steps`` tokens: its samples."""
    prefix = f"bench-worker-{uuid.uuid4().hex[:10]}"
    settings = InferenceSettings(
        transport="redis", redis_url=url, key_prefix=prefix, models={MODEL: {}}
    )
    engine = StepEngine(step_s, busy=busy)
    inner = RedisWorkerTransport.from_url(url, settings=settings, model=MODEL, worker_id="bench")
    transport = TimedTransport(inner=inner, engine=engine)
    worker = Worker(
        engine=engine,
        transport=transport,
        config=WorkerConfig(model=MODEL, worker_id="bench", io_thread=io_thread, idle_block_ms=50),
        observer=WorkerMetrics(model=MODEL) if metrics else None,
    )
    r = redis.Redis.from_url(url)
    stream = KeySpace(prefix).requests(MODEL)
    inner.setup()
    pipe = r.pipeline(transaction=False)
    for _ in range(streams):
        pipe.xadd(stream, {REQUEST_FIELD: encode(_request(steps))})
    pipe.execute()
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60 + steps * step_s * 5
    # Finished: every request answered, its entry acknowledged (deleted).
    while r.xlen(stream) > 0 or not engine.ends:
        if time.monotonic() > deadline:
            raise RuntimeError("the worker did not finish")
        time.sleep(0.01)
    stop.set()
    thread.join(30)
    inner.close()
    try:
        for key in r.scan_iter(match=f"{prefix}:*", count=1000):
            r.delete(key)
    finally:
        r.close()

    # While all streams run: a step whose batch is full, and the one after it.
    full = [i for i, size in enumerate(engine.sizes) if size == streams]
    gaps = [
        (engine.starts[i + 1] - engine.ends[i]) * 1000
        for i in full
        if i + 1 < len(engine.starts) and engine.sizes[i + 1] == streams
    ]
    steady = set(full)
    publish = [
        (written - engine.ends[index]) * 1000
        for index, written in transport.published
        if index in steady
    ]
    loop_thread_calls = transport.calls.get(thread.ident or 0, 0)
    elapsed = engine.ends[-1] - engine.starts[0]
    return {
        "gaps": gaps,
        "publish": publish,
        "loop_calls_per_step": loop_thread_calls / len(engine.starts),
        "steps_per_s": len(engine.starts) / elapsed,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/11")
    parser.add_argument("--keep-db", action="store_true", help="do not flush the database")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--steps", type=int, default=400, help="tokens per request")
    parser.add_argument("--step-ms", type=float, default=5.0)
    parser.add_argument("--busy", action="store_true", help="busy-wait the step (holds the GIL)")
    parser.add_argument("--rounds", type=int, default=2, help="per path and stream count")
    parser.add_argument(
        "--no-metrics", action="store_true", help="no WorkerMetrics observer (the loop alone)"
    )
    parser.add_argument(
        "--switch-ms",
        type=float,
        default=None,
        help="sys.setswitchinterval for this process (default: Python's, 5 ms)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    args = parser.parse_args(argv)
    if args.switch_ms is not None:
        sys.setswitchinterval(args.switch_ms / 1000)

    admin = redis.Redis.from_url(args.redis_url)
    db = int(admin.connection_pool.connection_kwargs.get("db", 0))
    if not args.keep_db:
        if db == 0:
            parser.error("refusing to flush database 0: give --redis-url a database of its own")
        admin.flushdb()
    pings = []
    for _ in range(200):
        started = time.perf_counter()
        admin.ping()
        pings.append((time.perf_counter() - started) * 1000)
    print(
        f"python={platform.python_version()} cpus={os.cpu_count()} "
        f"load={os.getloadavg()[0]:.1f} step={args.step_ms}ms ({'busy' if args.busy else 'sleep'}) "
        f"tokens/request={args.steps} rounds={args.rounds} batch={BATCH} "
        f"redis ping p50={statistics.median(pings):.3f}ms "
        f"metrics={'off' if args.no_metrics else 'on'} "
        f"switchinterval={sys.getswitchinterval() * 1000:g}ms"
    )
    header = (
        f"{'streams':>7} {'path':>4} {'gap p50':>8} {'gap p99':>8} {'pub p50':>8} "
        f"{'pub p99':>8} {'redis/step':>10} {'steps/s':>8}   (ms; redis/step: on the loop thread)"
    )
    print(header)
    summary: list[dict[str, Any]] = []
    try:
        for streams in args.streams:
            pooled: dict[str, dict[str, list[float]]] = {
                path: {"gaps": [], "publish": [], "calls": [], "rate": []}
                for path in ("old", "new")
            }
            for round_ in range(args.rounds):
                order = ("old", "new") if round_ % 2 == 0 else ("new", "old")
                for path in order:
                    result = run_once(
                        args.redis_url,
                        streams=streams,
                        steps=args.steps,
                        step_s=args.step_ms / 1000,
                        busy=args.busy,
                        io_thread=path == "new",
                        metrics=not args.no_metrics,
                    )
                    pooled[path]["gaps"] += result["gaps"]
                    pooled[path]["publish"] += result["publish"]
                    pooled[path]["calls"].append(result["loop_calls_per_step"])
                    pooled[path]["rate"].append(result["steps_per_s"])
            rows = {}
            for path, samples in pooled.items():
                row = {
                    "streams": streams,
                    "path": path,
                    "gap_p50_ms": statistics.median(samples["gaps"]),
                    "gap_p99_ms": _percentile(samples["gaps"], 0.99),
                    "publish_p50_ms": statistics.median(samples["publish"]),
                    "publish_p99_ms": _percentile(samples["publish"], 0.99),
                    "loop_redis_calls_per_step": statistics.mean(samples["calls"]),
                    "steps_per_s": statistics.mean(samples["rate"]),
                    "gap_samples": len(samples["gaps"]),
                    "publish_samples": len(samples["publish"]),
                }
                rows[path] = row
                summary.append(row)
                print(
                    f"{streams:>7} {path:>4} {row['gap_p50_ms']:8.3f} {row['gap_p99_ms']:8.3f} "
                    f"{row['publish_p50_ms']:8.3f} {row['publish_p99_ms']:8.3f} "
                    f"{row['loop_redis_calls_per_step']:10.2f} {row['steps_per_s']:8.1f}"
                )
            old, new = rows["old"], rows["new"]
            print(
                f"{streams:>7} {'new/old':>12} gap p50 {_ratio(new, old, 'gap_p50_ms')}, "
                f"gap p99 {_ratio(new, old, 'gap_p99_ms')}, "
                f"publish p50 {_ratio(new, old, 'publish_p50_ms')}, "
                f"publish p99 {_ratio(new, old, 'publish_p99_ms')}, "
                f"steps/s {_ratio(new, old, 'steps_per_s')}"
            )
    finally:
        if not args.keep_db:
            admin.flushdb()
        admin.close()
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


def _ratio(new: dict[str, Any], old: dict[str, Any], key: str) -> str:
    return f"{new[key] / old[key]:.2f}" if old[key] else "n/a"


if __name__ == "__main__":
    sys.exit(main())
