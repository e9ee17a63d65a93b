"""The worker hop: one request through Redis and a worker process, against the engine alone.

One request at a time (the one-client case of ``benchmarks/api.py``): the standard request
(``benchmarks/apibench/request.py``: a ~200 KB noise JPEG, a different one each time, a
short question, greedy, ``max_tokens`` 8, not streamed) with the image as the web side's
validation hands it on (raw RGB pixels in a binary PPM, 520 x 520: 0.77 MB; ``--formats
png`` sends a PNG instead, as ``api.py``'s ``engine`` mode does), sent from this process:

- ``inprocess``: through ``InProcessClient`` (the embedded mode's client: the worker loop and
  the engine in a thread of this process), the floor;
- ``redis``: through ``RedisStreamsClient`` to a real worker process (the entry point of
  ``python -m inference.worker``, run by this script with the hooks below installed first).

Modes alternate per round, so load from outside hits both alike. The ratio printed is the
in-process p50 over the Redis p50 (at one client that is req/s over req/s, what ``api.py``
reports). Where the difference goes: ``time.time()`` stamps, shared by the processes of one
machine, at each hand-off of each request, from hooks around the worker's own methods (a
list append each, microseconds): the web side's enqueue, the worker's ``XREADGROUP``, its
cancel-mark read, its blob read, the IO thread's hand-over, the engine thread's take,
``engine.add_request``, the engine steps, the terminal event's hand-over and publish, and
the client's read of the answer; the breakdown is the median of each interval. Also per
request, while the engine held it: each thread's CPU time and minor page faults (from
``/proc``), and each engine step's time.

``--worker-env NAME=VALUE`` sets a variable of the worker process, for trials:
``GLIBC_TUNABLES=glibc.malloc.perturb=0`` (glibc's default malloc, as before the worker
set its own: ``inference.allocator.keep_freed_memory`` leaves a tuned malloc alone),
``OMP_WAIT_POLICY=PASSIVE``...

It uses a Redis database (``--redis-url``, default db 3, as ``api.py``) under a key prefix of
its own, deleted afterwards, and the tiny checkpoint of ``--model-dir`` (else one is built in
a temp dir, ~15 s):

    flock /tmp/bench.lock .venv/bin/python benchmarks/worker_hop.py --model-dir /tmp/tiny
    .venv/bin/python benchmarks/worker_hop.py --requests 40 --rounds 3 --formats ppm png
    .venv/bin/python benchmarks/worker_hop.py --worker-env GLIBC_TUNABLES=glibc.malloc.perturb=0
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import functools
import hashlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# The stages of one request, in order; each figure of the breakdown is the time from the
# stage before. "enqueued": the enqueue script returned (in-process: the queue put).
STAGES = [
    ("created", "request built (created_at)"),
    ("enqueued", "enqueue (the pipeline with the image)"),
    ("fetched", "to the worker's XREADGROUP return"),
    ("marks", "cancel-mark read"),
    ("images", "blob read"),
    ("handed", "IO thread hands it over"),
    ("taken", "engine thread takes it"),
    ("added", "admitted (engine.add_request)"),
    ("step_start", "to the first engine step"),
    ("routed", "engine steps (to the terminal event)"),
    ("handed_over", "terminal event handed to the IO"),
    ("publish_start", "IO thread starts the publish"),
    ("published", "publish (XADD, XACK, XDEL)"),
    ("answer", "the client reads the answer"),
]


class HopTrace:
    """Wall-clock stamps per request id and stage; the first stamp of a stage is kept."""

    def __init__(self) -> None:
        self.stamps: dict[str, dict[str, float]] = {}
        self.lock = threading.Lock()

    def mark(self, rid: str, stage: str, at: float | None = None, *, last: bool = False) -> None:
        at = time.time() if at is None else at
        with self.lock:
            stamps = self.stamps.setdefault(rid, {})
            if last or stage not in stamps:
                stamps[stage] = at

    def add(self, rid: str, stage: str, value: float) -> None:
        with self.lock:
            stamps = self.stamps.setdefault(rid, {})
            stamps[stage] = stamps.get(stage, 0.0) + value


TRACE = HopTrace()


def _wrap(cls: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    original = getattr(cls, name)
    setattr(cls, name, functools.wraps(original)(make(original)))


def thread_counters() -> dict[str, float]:
    """Per thread of this process (by its Python name): CPU seconds (``cpu:``) and minor
    page faults (``faults:``), from ``/proc`` (Linux; empty elsewhere)."""
    out: dict[str, float] = {}
    for thread in threading.enumerate():
        task = f"/proc/self/task/{thread.native_id}"
        name = thread.name.split("_")[0]  # a pool's threads counted together
        try:
            with open(f"{task}/schedstat") as f:
                cpu = int(f.read().split()[0]) / 1e9
            with open(f"{task}/stat") as f:
                faults = int(f.read().rsplit(")", 1)[1].split()[7])  # minflt
        except (OSError, ValueError, IndexError):
            continue
        out[f"cpu:{name}"] = out.get(f"cpu:{name}", 0.0) + cpu
        out[f"faults:{name}"] = out.get(f"faults:{name}", 0.0) + faults
    return out


def install_worker_hooks(trace: HopTrace = TRACE) -> None:
    """Stamp the worker loop's hand-offs (either transport) into ``trace``."""
    from inference.client.inprocess import InProcessWorkerTransport
    from inference.worker.io import WorkerIO
    from inference.worker.loop import Worker
    from inference.worker.redis_streams import RedisWorkerTransport

    def take_(orig: Callable[..., Any]) -> Callable[..., Any]:
        def hook(self: WorkerIO, deliveries: list[Any]) -> Any:
            now = time.time()
            for delivery in deliveries:
                trace.mark(delivery.request.request_id, "fetched", now)
            return orig(self, deliveries)

        return hook

    def cancelled(orig: Callable[..., Any]) -> Callable[..., Any]:
        def hook(self: Any, request_ids: Any) -> Any:
            result = orig(self, request_ids)
            now = time.time()
            for rid in request_ids:
                trace.mark(rid, "marks", now)
            return result

        return hook

    def images(orig: Callable[..., Any]) -> Callable[..., Any]:
        def hook(self: WorkerIO, delivery: Any, is_cancelled: bool) -> Any:
            result = orig(self, delivery, is_cancelled)
            trace.mark(delivery.request.request_id, "images")
            return result

        return hook

    def read_marks(orig: Callable[..., Any]) -> Callable[..., Any]:
        def hook(self: WorkerIO) -> Any:
            with self._cond:
                rids = [d.request.request_id for d in self._taken]
            result = orig(self)
            now = time.time()
            for rid in rids:
                trace.mark(rid, "handed", now)
            return result

        return hook

    def take(orig: Callable[..., Any]) -> Callable[..., Any]:
        def hook(self: WorkerIO, wait_s: float = 0.0) -> Any:
            admissions, cancels = orig(self, wait_s)
            now = time.time()
            for arrival in admissions:
                trace.mark(arrival.delivery.request.request_id, "taken", now)
            return admissions, cancels

        return hook

    cpu_at: dict[str, dict[str, float]] = {}

    def admit(orig: Callable[..., Any]) -> Callable[..., Any]:
        def hook(self: Worker, admission: Any) -> Any:
            result = orig(self, admission)
            rid = admission.delivery.request.request_id
            cpu_at[rid] = thread_counters()
            trace.mark(rid, "added")
            return result

        return hook

    def step(orig: Callable[..., Any]) -> Callable[..., Any]:
        def hook(self: Worker) -> Any:
            rids = list(self._inflight)
            started = time.time()
            result = orig(self)
            ended = time.time()
            for rid in rids:
                trace.mark(rid, "step_start", started)
                trace.add(rid, "step_s", ended - started)
                trace.add(rid, "steps", 1)
                trace.mark(rid, f"step{int(trace.stamps[rid]['steps'])}_s", ended - started)
                if rid not in self._inflight:
                    trace.mark(rid, "routed", ended)
                    before = cpu_at.pop(rid, {})
                    for name, value in thread_counters().items():
                        trace.add(rid, name, value - before.get(name, value))
            return result

        return hook

    def hand_over(orig: Callable[..., Any]) -> Callable[..., Any]:
        def hook(self: WorkerIO, outgoing: list[Any]) -> Any:
            now = time.time()
            for out in outgoing:
                if out.ack_token is not None:
                    trace.mark(out.request_id, "handed_over", now)
            return orig(self, outgoing)

        return hook

    def publish(orig: Callable[..., Any]) -> Callable[..., Any]:
        def hook(self: Any, batch: Any) -> Any:
            started = time.time()
            result = orig(self, batch)
            ended = time.time()
            for out in batch:
                if out.ack_token is not None:
                    trace.mark(out.request_id, "publish_start", started)
                    trace.mark(out.request_id, "published", ended)
            return result

        return hook

    _wrap(WorkerIO, "_take", take_)
    _wrap(WorkerIO, "_images", images)
    _wrap(WorkerIO, "_read_marks", read_marks)
    _wrap(WorkerIO, "take", take)
    _wrap(WorkerIO, "hand_over", hand_over)
    _wrap(Worker, "_admit", admit)
    _wrap(Worker, "_step", step)
    for transport in (RedisWorkerTransport, InProcessWorkerTransport):
        _wrap(transport, "cancelled", cancelled)
        _wrap(transport, "publish", publish)


def install_client_hooks(trace: HopTrace = TRACE) -> None:
    """Stamp the Redis client's end of its enqueue (its reply read starts right after)."""
    from inference.client.redis_streams import RedisStreamsClient

    original = RedisStreamsClient.events

    async def events(
        self: RedisStreamsClient, request_id: str, **kwargs: Any
    ) -> AsyncIterator[Any]:
        trace.mark(request_id, "enqueued")
        async for event in original(self, request_id, **kwargs):
            yield event

    RedisStreamsClient.events = events  # type: ignore[method-assign]


def serve_worker(trace_path: str, argv: list[str]) -> int:
    """``python -m inference.worker`` with the hooks installed; the stamps are written to
    ``trace_path`` when it exits (SIGTERM: it drains, then returns)."""
    install_worker_hooks()
    atexit.register(lambda: Path(trace_path).write_text(json.dumps(TRACE.stamps)))
    from inference.worker.main import main

    return main(argv)


# --- the load side -------------------------------------------------------------------


def standard_images(count: int, image_format: str) -> list[tuple[bytes, Any]]:
    """``count`` distinct standard images as the engine gets them, with their refs."""
    from apibench.request import distinct_jpegs
    from PIL import Image

    from inference.protocol import ImageRef

    out = []
    for jpeg in distinct_jpegs(count):
        image = Image.open(io.BytesIO(jpeg)).convert("RGB")
        buffer = io.BytesIO()
        if image_format == "png":
            image.save(buffer, format="PNG", compress_level=1)
        else:
            image.save(buffer, format="PPM")  # what webplatform/uploads/validation.py hands on
        data = buffer.getvalue()
        sha = hashlib.sha256(data).hexdigest()
        out.append((data, ImageRef(sha256=sha, width=image.width, height=image.height)))
    return out


async def one_request(client: Any, data: bytes, ref: Any, mode: str) -> tuple[str, float]:
    """Send one standard request; its id and its latency (submit to terminal event)."""
    from apibench.request import inference_request

    from inference.protocol import DoneEvent, ErrorEvent

    await client.put_image(tenant_id="bench", data=data, ref=ref)
    request = inference_request(ref)
    rid = request.request_id
    TRACE.mark(rid, "created", request.created_at)
    started = time.perf_counter()
    if mode == "inprocess":
        TRACE.mark(rid, "enqueued")  # a queue put, microseconds
    async for event in client.submit(request):
        if isinstance(event, ErrorEvent):
            raise RuntimeError(f"{mode}: {event.code.value} {event.message}")
        if isinstance(event, DoneEvent):
            TRACE.mark(rid, "answer")
            return rid, time.perf_counter() - started
    raise RuntimeError(f"{mode}: no terminal event")


@contextlib.contextmanager
def worker_process(
    args: argparse.Namespace, model_dir: Path, trace_path: Path, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    from apibench.processes import process
    from apibench.request import MODEL, model_spec

    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_")}
    env.update(
        PYTHONPATH=str(REPO),
        INFERENCE_MODELS=json.dumps({MODEL: model_spec(model_dir)}),
        INFERENCE_REDIS_URL=args.redis_url,
        INFERENCE_KEY_PREFIX=args.prefix,
        LOG_LEVEL="WARNING",
        OMP_NUM_THREADS=str(args.torch_threads),
    )
    for item in args.worker_env:
        name, _, value = item.partition("=")
        env[name] = value
    command = [sys.executable, __file__, "serve-worker", str(trace_path), "--model", MODEL]
    with process(command, env, log) as proc:
        yield proc


def cleanup_keys(redis_url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def breakdown(rids: list[str], stamps: dict[str, dict[str, float]]) -> list[tuple[str, float]]:
    """Median ms of each stage's interval from the stage before, over ``rids``."""
    rows = []
    for (prev, _), (stage, label) in zip(STAGES, STAGES[1:], strict=False):
        gaps = [
            (stamps[r][stage] - stamps[r][prev]) * 1000
            for r in rids
            if stage in stamps.get(r, {}) and prev in stamps[r]
        ]
        rows.append((label, statistics.median(gaps) if gaps else float("nan")))
    return rows


async def run(args: argparse.Namespace, model_dir: Path, tmp: Path) -> dict[str, Any]:
    import torch
    from apibench.request import MODEL, model_spec

    from inference.client.inprocess import InProcessClient
    from inference.client.redis_streams import RedisStreamsClient
    from inference.settings import InferenceSettings

    torch.set_num_threads(args.torch_threads)  # as OMP_NUM_THREADS gives the worker
    install_worker_hooks()
    install_client_hooks()
    models = {MODEL: model_spec(model_dir)}
    clients = {
        "inprocess": InProcessClient(settings=InferenceSettings(models=models)),
        "redis": RedisStreamsClient(
            settings=InferenceSettings(
                transport="redis", redis_url=args.redis_url, key_prefix=args.prefix, models=models
            )
        ),
    }
    per_mode = args.warm_up + args.rounds * args.requests
    images = {f: iter(standard_images(per_mode * 2, f)) for f in args.formats}
    trace_path = tmp / "worker-trace.json"
    log = tmp / "worker.log"
    latencies: dict[tuple[str, str], list[float]] = {}
    rids: dict[tuple[str, str], list[str]] = {}
    with worker_process(args, model_dir, trace_path, log) as proc:
        for fmt in args.formats:  # warm up both (loads the in-process engine; waits the worker)
            for mode in args.modes:
                deadline = time.monotonic() + 180
                for _ in range(args.warm_up):
                    while True:
                        if proc.poll() is not None:
                            raise RuntimeError(f"worker exited:\n{log.read_text()[-3000:]}")
                        health = await clients[mode].model_health(MODEL)
                        if health.live_workers or time.monotonic() > deadline:
                            break
                        await asyncio.sleep(0.25)
                    data, ref = next(images[fmt])
                    await one_request(clients[mode], data, ref, mode)
        for round_no in range(args.rounds):
            order = args.modes if round_no % 2 == 0 else list(reversed(args.modes))
            for fmt in args.formats:
                for mode in order:
                    key = (mode, fmt)
                    for _ in range(args.requests):
                        data, ref = next(images[fmt])
                        rid, latency = await one_request(clients[mode], data, ref, mode)
                        latencies.setdefault(key, []).append(latency)
                        rids.setdefault(key, []).append(rid)
                    lat = latencies[key][-args.requests :]
                    print(
                        f"round {round_no + 1} {mode:>9} {fmt}: p50 "
                        f"{statistics.median(lat) * 1000:6.1f} ms",
                        flush=True,
                    )
        await clients["redis"].aclose()  # type: ignore[attr-defined]
    await clients["inprocess"].aclose()  # type: ignore[attr-defined]
    worker_stamps = json.loads(trace_path.read_text()) if trace_path.exists() else {}
    stamps = TRACE.stamps
    for rid, worker_side in worker_stamps.items():
        stamps.setdefault(rid, {}).update(worker_side)
    return report(args, latencies, rids, stamps)


def report(
    args: argparse.Namespace,
    latencies: dict[tuple[str, str], list[float]],
    rids: dict[tuple[str, str], list[str]],
    stamps: dict[str, dict[str, float]],
) -> dict[str, Any]:
    summary: dict[str, Any] = {"rows": [], "breakdown": {}}
    print(f"\n{args.rounds} rounds x {args.requests} requests, one at a time")
    print(f"{'mode':>9} {'image':>5} {'p50 ms':>7} {'p99 ms':>7} {'steps':>5} {'step ms':>7}")
    for (mode, fmt), lat in latencies.items():
        ids = rids[(mode, fmt)]
        steps = statistics.median(stamps[r].get("steps", 0) for r in ids)
        step_ms = statistics.median(stamps[r].get("step_s", 0) for r in ids) * 1000
        row = {
            "mode": mode,
            "image": fmt,
            "p50_ms": statistics.median(lat) * 1000,
            "p99_ms": percentile(lat, 0.99) * 1000,
            "steps": steps,
            "engine_step_ms": step_ms,
            "requests": len(lat),
        }
        summary["rows"].append(row)
        print(
            f"{mode:>9} {fmt:>5} {row['p50_ms']:7.1f} {row['p99_ms']:7.1f} {steps:5.0f} "
            f"{step_ms:7.1f}"
        )
    for fmt in args.formats:
        if ("inprocess", fmt) in latencies and ("redis", fmt) in latencies:
            floor = statistics.median(latencies[("inprocess", fmt)])
            hop = statistics.median(latencies[("redis", fmt)])
            summary[f"ratio_{fmt}"] = floor / hop
            print(
                f"{fmt}: in-process p50 / Redis p50 = {floor / hop:.2f} (+{(hop - floor) * 1000:.1f} ms)"
            )
    print("\nbreakdown, median ms from the stage before:")
    keys = list(latencies)
    print(f"{'stage':<42}" + "".join(f"{m + ' ' + f:>15}" for m, f in keys))
    tables = {key: breakdown(rids[key], stamps) for key in keys}
    for i, (_stage, label) in enumerate(STAGES[1:]):
        print(f"{label:<42}" + "".join(f"{tables[key][i][1]:15.2f}" for key in keys))
    print("\nwhile the engine held the request (median): CPU ms and page faults per thread")
    for key in keys:
        names = sorted({k for r in rids[key] for k in stamps[r] if k.startswith("cpu:")})
        parts = []
        for name in names:
            thread = name[4:]
            cpu = statistics.median(stamps[r].get(name, 0) for r in rids[key]) * 1000
            faults = statistics.median(stamps[r].get(f"faults:{thread}", 0) for r in rids[key])
            if cpu >= 0.01 or faults:
                parts.append(f"{thread} {cpu:.1f} ms {faults:.0f} faults")
        print(f"{key[0]} {key[1]}: " + ", ".join(parts))
    print("\neach engine step, median ms:")
    for key in keys:
        per_step = []
        for n in range(1, 64):
            vals = [stamps[r][f"step{n}_s"] for r in rids[key] if f"step{n}_s" in stamps[r]]
            if not vals:
                break
            per_step.append(f"{statistics.median(vals) * 1000:.1f}")
        print(f"{key[0]} {key[1]}: " + " ".join(per_step))
    for key in keys:
        summary["breakdown"][f"{key[0]}_{key[1]}"] = dict(tables[key])
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=30, help="per mode and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warm-up", type=int, default=4, help="requests per mode first")
    parser.add_argument("--modes", nargs="+", default=["inprocess", "redis"])
    parser.add_argument("--formats", nargs="+", default=["ppm"], choices=["ppm", "png"])
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/3")
    parser.add_argument("--model-dir", default="", help="an existing tiny checkpoint")
    parser.add_argument(
        "--worker-env", action="append", default=[], help="NAME=VALUE for the worker process"
    )
    parser.add_argument("--json", default="", help="write the summary here")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    args.prefix = f"bench-hop-{uuid.uuid4().hex[:10]}"
    with tempfile.TemporaryDirectory(prefix="bench-hop-") as tmp_name:
        tmp = Path(tmp_name)
        if args.model_dir:
            model_dir = Path(args.model_dir)
        else:
            from apibench.setups import build_tiny_model

            model_dir = tmp / "tiny-glm4v"
            build_tiny_model(model_dir)
        try:
            summary = asyncio.run(run(args, model_dir, tmp))
        finally:
            cleanup_keys(args.redis_url, args.prefix)
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve-worker"]:
        sys.exit(serve_worker(sys.argv[2], sys.argv[3:]))
    main()
