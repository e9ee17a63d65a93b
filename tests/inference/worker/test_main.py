"""The worker's entry point (inference/worker/main.py, ``python -m inference.worker``).

First what a worker process imports: a fresh interpreter, no web code. Then worker
PROCESSES with the real tiny model and Redis: two workers, A and B, start in parallel for
those tests (model loading dominates the cost) and share one queue under their own key
prefix. They run in order: the first kills A, the second stops the survivor B with SIGTERM.
Every request uses the same greedy prompt, so every complete answer has the same text.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from inference.client.redis_streams import RedisStreamsClient
from inference.protocol import (
    DeltaEvent,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    KeySpace,
    decode_event,
    decode_request,
)
from inference.settings import InferenceSettings
from tests.fresh_interpreter import python_json
from tests.inference.fakes import (
    delete_prefix,
    make_request,
    redis_url_for_tests,
    unique_prefix,
)

MODEL = "tiny"
ROOT = Path(__file__).resolve().parents[3]
CLAIM_IDLE_MS = 1500
PROMPT = "hello world"


# --- what a worker process imports -------------------------------------------------------

# Run in a fresh interpreter: the modules of this project in sys.modules, and whether
# Django's settings were configured, once the code before it ran.
_REPORT = """
import json, sys
conf = sys.modules.get("django.conf")
print(json.dumps({
    "project": sorted(m for m in sys.modules if m.split(".")[0] in ("inference", "tenants", "webplatform")),
    "settings_configured": conf is not None and conf.settings.configured,
    "torch": "torch" in sys.modules,
}))
"""


def _fresh_interpreter(code: str, env: dict[str, str] | None = None) -> dict:
    # DJANGO_SETTINGS_MODULE stays set (as pytest-django set it): touching Django's
    # settings would then load webplatform.settings, which the test would see.
    report: dict = python_json(code + _REPORT, env={**os.environ, **(env or {})})
    return report


def _no_web_code(report: dict) -> None:
    web = [m for m in report["project"] if m.startswith(("tenants", "webplatform"))]
    assert web == []
    assert not report["settings_configured"]


def test_the_worker_entry_point_imports_no_web_code():
    report = _fresh_interpreter("import inference.worker.main")
    _no_web_code(report)
    assert "inference.worker.main" in report["project"]
    assert not any(m.startswith("inference.client") for m in report["project"])


def test_a_worker_that_reached_its_loop_has_loaded_no_web_code():
    """The whole start-up (settings, engine, transport) of an ocr-lite worker, stopped where
    the loop would begin; ocr-lite needs no torch either."""
    code = """
from inference.worker import loop, main
loop.Worker.run = lambda self, stop: None  # stop where serving would begin
assert main.main(["--model", "ocr-lite"]) == 0
"""
    env = {
        "INFERENCE_MODELS": json.dumps({"ocr-lite": {"kind": "ocr-lite"}}),
        "INFERENCE_REDIS_URL": "redis://127.0.0.1:1/0",  # never dialled before the loop
    }
    report = _fresh_interpreter(code, env)
    _no_web_code(report)
    assert {"inference.worker.engines", "inference.ocr_lite.engine"} <= set(report["project"])
    assert not report["torch"]


_REALLOCATE = """
import json, resource, sys
from inference.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
def request():  # what each request does: the same buffers (a step's tensors) again
    held = [bytearray(1 << 20) for _ in range(16)]
    del held

request()  # the first one faults its pages in either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    request()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"kept": kept, "faults": faults}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_worker_reuses_freed_memory_instead_of_faulting_it_in_again():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_"))}

    def run(mode: str, extra: dict[str, str] | None = None) -> dict[str, Any]:
        return dict(python_json(_REALLOCATE, mode, env={**env, **(extra or {})}))

    pages = 20 * 16 * (1 << 20) // 4096
    # glibc's default: trimmed from the heap (or unmapped) when freed, faulted in again.
    assert run("default")["faults"] > pages // 2
    kept = run("keep")
    assert kept["kept"] is True and kept["faults"] < pages // 20
    # An operator's own malloc settings are left alone.
    assert run("keep", {"MALLOC_TOP_PAD_": "0"})["kept"] is False


def test_bad_arguments_are_refused_before_any_model_loads():
    env = {**os.environ, "INFERENCE_MODELS": json.dumps({"ocr-lite": {"kind": "ocr-lite"}})}
    cases = {
        "nope": ({"INFERENCE_REDIS_URL": "redis://127.0.0.1:1/0"}, "unknown model 'nope'"),
        "ocr-lite": ({"INFERENCE_REDIS_URL": "", "REDIS_URL": ""}, "needs INFERENCE_REDIS_URL"),
    }
    for model, (extra, message) in cases.items():
        argv = [sys.executable, "-m", "inference.worker", "--model", model]
        out = subprocess.run(
            argv, cwd=ROOT, env={**env, **extra}, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 2 and message in out.stderr, out.stderr


def test_manage_py_inference_worker_still_runs_the_same_entry_point():
    env = {
        **os.environ,
        "INFERENCE_MODELS": json.dumps({"ocr-lite": {"kind": "ocr-lite"}}),
        "INFERENCE_REDIS_URL": "redis://127.0.0.1:1/0",
    }
    argv = [sys.executable, "manage.py", "inference_worker", "--model", "nope"]
    out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unknown model 'nope'" in out.stderr, out.stderr
    assert "python -m inference.worker" in out.stderr  # the worker's own usage line


# --- worker processes ----------------------------------------------------------------------


class WorkerProcess:
    def __init__(
        self, *, url: str, prefix: str, worker_id: str, log_dir: Path, model_dir: Path
    ) -> None:
        self.worker_id = worker_id
        self.keys = KeySpace(prefix)
        self.log_path = log_dir / f"{worker_id}.log"
        env = {
            **os.environ,
            "REDIS_URL": url,
            "INFERENCE_REDIS_URL": url,
            "INFERENCE_TRANSPORT": "redis",
            "INFERENCE_MODELS": json.dumps(
                {MODEL: {"path": str(model_dir), "dtype": "float32", "device": "cpu"}}
            ),
            "INFERENCE_CLAIM_IDLE_MS": str(CLAIM_IDLE_MS),
            "INFERENCE_HEARTBEAT_SECONDS": "0.3",
            "PLATFORM_TESTING": "1",
        }
        argv = [sys.executable, "-m", "inference.worker", "--model", MODEL]
        argv += ["--worker-id", worker_id, "--key-prefix", prefix, "--max-batch-size", "4"]
        argv += ["--drain-seconds", "20"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=log)

    def wait_ready(self, r: redis.Redis, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not r.exists(self.keys.heartbeat(MODEL, self.worker_id)):
            assert self.proc.poll() is None, f"worker exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"worker not ready:\n{self.log()}"
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def workers(tmp_path_factory, tiny_model_dir):
    url = redis_url_for_tests()
    if url is None:
        pytest.skip("needs REDIS_URL pointing at a reachable Redis")
    prefix = unique_prefix()
    log_dir = tmp_path_factory.mktemp("worker-logs")
    procs = {
        name: WorkerProcess(
            url=url,
            prefix=prefix,
            worker_id=f"w{name}",
            log_dir=log_dir,
            model_dir=tiny_model_dir,
        )
        for name in ("A", "B")
    }
    r = redis.Redis.from_url(url)
    try:
        for proc in procs.values():
            proc.wait_ready(r)
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()
        r.close()
        delete_prefix(url, prefix)


def _client(url: str, prefix: str) -> RedisStreamsClient:
    settings = InferenceSettings(
        transport="redis", redis_url=url, key_prefix=prefix, models={MODEL: {}}
    )
    return RedisStreamsClient(settings=settings)


async def _ask(client, request) -> list:
    return [e async for e in client.submit(request, time_limit_s=60)]


def _text(events) -> str:
    return "".join(e.text for e in events if isinstance(e, DeltaEvent))


def _reply(r, keys, request_id) -> list:
    return [decode_event(f[b"e"]) for _id, f in r.xrange(keys.reply(request_id))]


def _pending_of(r, keys, consumer: str) -> list:
    """(request, delta count in its reply) for each entry pending to ``consumer``."""
    stream = keys.requests(MODEL)
    out = []
    for p in r.xpending_range(stream, "workers", "-", "+", 100, consumername=consumer):
        entries = r.xrange(stream, p["message_id"], p["message_id"])
        if entries:
            request = decode_request(entries[0][1][b"r"])
            deltas = sum(isinstance(e, DeltaEvent) for e in _reply(r, keys, request.request_id))
            out.append((request, deltas))
    return out


@pytest.mark.redis
@pytest.mark.slow
async def test_two_workers_answer_everything_once_and_recover_a_killed_workers_work(workers):
    a, b = workers["A"], workers["B"]
    url = redis_url_for_tests()
    keys = a.keys
    r = redis.Redis.from_url(url)
    client = _client(url, keys.prefix)
    try:
        # 1. Both workers serve; every request is answered exactly once.
        first = [
            make_request(PROMPT, model=MODEL, max_tokens=64, stream=i % 2 == 0) for i in range(8)
        ]
        results = await asyncio.wait_for(asyncio.gather(*(_ask(client, q) for q in first)), 60)
        reference = _text(results[0])
        assert reference and all(isinstance(ev[-1], DoneEvent) for ev in results), results
        assert all(_text(ev) == reference for ev in results)
        health = await client.model_health(MODEL)
        assert health.live_workers == 2 and health.capacity == 8

        # 2. SIGKILL worker A while it has a streamed request mid-answer and a non-streamed
        # one in flight.
        second = [
            make_request(PROMPT, model=MODEL, max_tokens=64, stream=i % 2 == 0) for i in range(16)
        ]
        tasks = [asyncio.create_task(_ask(client, q)) for q in second]
        deadline = time.monotonic() + 30
        while True:
            pending = await asyncio.to_thread(_pending_of, r, keys, "wA")
            streamed = [q for q, deltas in pending if q.stream and deltas > 0]
            quiet = [q for q, _ in pending if not q.stream]
            if streamed and quiet:
                break
            assert time.monotonic() < deadline, "worker A never had the wanted work in flight"
            await asyncio.sleep(0.005)
        os.kill(a.proc.pid, signal.SIGKILL)
        a.proc.wait(10)
        lost = await asyncio.to_thread(_pending_of, r, keys, "wA")  # frozen now
        assert lost
        results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    finally:
        await client.aclose()

    by_id = {q.request_id: ev for q, ev in zip(second, results, strict=True)}
    lost_ids = set()
    for request, deltas_at_kill in lost:
        lost_ids.add(request.request_id)
        events = by_id[request.request_id]
        if request.stream and deltas_at_kill:
            assert events[-1] == ErrorEvent(
                ErrorCode.WORKER_LOST, events[-1].message, retryable=False
            )
            text = _text(events)
            assert len([e for e in events if isinstance(e, DeltaEvent)]) == deltas_at_kill
            assert reference.startswith(text)  # what was sent, once, and nothing more
        else:  # retried by B without the client noticing
            assert isinstance(events[-1], DoneEvent), events
            assert _text(events) == reference
    assert any(not q.stream for q, _ in lost)
    for request_id, events in by_id.items():
        if request_id not in lost_ids:
            assert isinstance(events[-1], DoneEvent) and _text(events) == reference
        # Exactly one terminal event in the reply stream itself, not only in what we read.
        written = _reply(r, keys, request_id)
        assert sum(isinstance(e, DoneEvent | ErrorEvent) for e in written) == 1, written
    stream = keys.requests(MODEL)
    assert r.xlen(stream) == 0 and r.xpending(stream, "workers")["pending"] == 0
    assert b.proc.poll() is None
    r.close()


@pytest.mark.redis
@pytest.mark.slow
async def test_sigterm_finishes_the_running_batch_then_exits_0(workers):
    c = workers["B"]  # the survivor of the previous test, now alone on its queue
    assert c.proc.poll() is None, c.log()
    url = redis_url_for_tests()
    r = redis.Redis.from_url(url)
    client = _client(url, c.keys.prefix)
    try:
        batch = [make_request(PROMPT, model=MODEL, max_tokens=64, stream=i < 2) for i in range(4)]
        tasks = [asyncio.create_task(_ask(client, q)) for q in batch]
        deadline = time.monotonic() + 30
        while r.xpending(c.keys.requests(MODEL), "workers")["pending"] < 4:
            assert time.monotonic() < deadline, c.log()
            await asyncio.sleep(0.005)
        c.proc.send_signal(signal.SIGTERM)
        # The signal reaches Python between two of the engine thread's operations; until
        # then the IO thread may still take requests (up to the batch and the prefetch).
        # Sent once the worker has stopped taking work:
        deadline = time.monotonic() + 10
        while "worker stopping" not in c.log():
            assert time.monotonic() < deadline, c.log()
            await asyncio.sleep(0.005)
        late = make_request(PROMPT, model=MODEL, max_tokens=64)
        late_task = asyncio.create_task(_ask(client, late))
        results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        assert await asyncio.to_thread(c.proc.wait, 30) == 0, c.log()
        # Taken before SIGTERM: finished. Sent after: left queued for another worker, and
        # since none is left its client hears so at once (a retryable worker_lost), not
        # after the request timeout.
        texts = {_text(events) for events in results}
        assert all(isinstance(events[-1], DoneEvent) for events in results), results
        assert len(texts) == 1 and texts.pop()
        assert r.xlen(c.keys.requests(MODEL)) == 1
        assert not r.exists(c.keys.heartbeat(MODEL, "wB"))
        late_events = await asyncio.wait_for(late_task, 5)
        assert isinstance(late_events[-1], ErrorEvent), late_events
        assert late_events[-1].code == ErrorCode.WORKER_LOST and late_events[-1].retryable
        assert not any(isinstance(e, DeltaEvent) for e in late_events)
        log = c.log()
        assert "worker ready" in log and "worker stop" in log
    finally:
        await client.aclose()
        r.close()
