"""What the whole HTTP path costs on top of the engine: requests/s and p50/p99 latency.

One standard request, non-streamed: a ~200 KB noise JPEG (data URI; a different image in
every request, so neither the answer cache nor the engine's image-embedding cache answers)
+ a short question, greedy, ``max_tokens`` 8, answer cache off (``"cache": false``). Sent by
``--clients`` concurrent workers (closed loop: each sends its next request when its last
one is answered; ``httpx.AsyncClient`` for HTTP) to three setups, all started first, then
measured in ``--rounds`` rounds with modes and client counts interleaved, so that load from
outside (a shared machine) hits all alike; the summary keeps each figure's best round:

- ``engine``: the same request straight into the inference client in this process (the
  in-process transport, worker thread and engine of the embedded mode), no HTTP, no
  authentication, admission, validation or settlement: the floor;
- ``embedded``: ``uvicorn webplatform.asgi:application`` as a subprocess in the embedded
  mode (SQLite file in a temp dir, process-local cache and quotas, in-process inference);
- ``redis``: the production wiring: uvicorn subprocess on PostgreSQL (a scratch database
  created and dropped by this script) and Redis (cache, quotas, Redis Streams queue, all
  under unique key prefixes deleted afterwards), plus one
  ``manage.py inference_worker`` subprocess.

Each HTTP request runs the real path: API-key authentication, quota admission, image
validation (decode, pixel cap, re-encode to PNG; ClamAV INSTREAM scan when ``--clamd-url``
or ``CLAMD_URL`` is given), queue, tiny model, response, usage record and quota settlement.

    CLAMD_URL=$(bash scripts/clamd-test.sh) .venv/bin/python benchmarks/api.py

Options: ``--clients 1 16 64``, ``--modes engine embedded redis``, ``--rounds``,
``--min-requests`` and ``--requests-per-client`` (a level sends the larger of the minimum
and per-client count times clients),
``--database-url`` (the PostgreSQL server for the scratch database), ``--redis-url``,
``--model-dir`` (reuse a tiny checkpoint; else one is built in the temp dir, ~15 s).
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import base64
import contextlib
import hashlib
import io
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL = "glm-4.6v-flash"
QUESTION = "What is in this image?"
MAX_TOKENS = 8
JPEG_TARGET_BYTES = 200_000
WARM_UP_REQUESTS = 4

BENCH_SETTINGS = '''
"""Benchmark settings: the project's, plus what has no environment variable."""
import os

from webplatform.settings import *  # noqa: F403

QUOTA_KEY_PREFIX = os.environ["BENCH_QUOTA_KEY_PREFIX"]
'''


# --- the standard request ---------------------------------------------------------------


def noise_jpeg(target_bytes: int, *, seed: int = 0, side: int = 200) -> bytes:
    """A JPEG of random noise of about ``target_bytes`` (noise does not compress)."""
    import numpy as np
    from PIL import Image

    while True:
        pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=85)
        if buffer.tell() >= target_bytes:
            return buffer.getvalue()
        side += 10


def distinct_jpegs(count: int) -> list[bytes]:
    """``count`` different JPEGs of the same size: every request brings a new image, so the
    engine's image-embedding cache never answers for the vision tower (as in real traffic,
    where a hit needs the same tenant to resend the same image)."""
    first = noise_jpeg(JPEG_TARGET_BYTES)
    side = _side_of(first)
    return [first] + [noise_jpeg(0, seed=seed, side=side) for seed in range(1, count)]


def _side_of(jpeg: bytes) -> int:
    from PIL import Image

    return Image.open(io.BytesIO(jpeg)).width


def request_body(jpeg: bytes) -> bytes:
    uri = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    body = {
        "model": MODEL,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": uri}},
                    {"type": "text", "text": QUESTION},
                ],
            }
        ],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "cache": False,
    }
    return json.dumps(body).encode()


# --- measurement ------------------------------------------------------------------------


@dataclass
class Result:
    mode: str
    clients: int
    requests: int
    wall_s: float
    latencies_s: list[float]
    errors: dict[str, int]

    @property
    def rps(self) -> float:
        return len(self.latencies_s) / self.wall_s

    def percentile_ms(self, fraction: float) -> float:
        ordered = sorted(self.latencies_s)
        if not ordered:
            return float("nan")
        position = fraction * (len(ordered) - 1)
        low, high = int(position), min(int(position) + 1, len(ordered) - 1)
        value = ordered[low] + (ordered[high] - ordered[low]) * (position - low)
        return value * 1000


async def closed_loop(
    clients: int, inputs: Iterator[Any], total: int, call: Any
) -> tuple[float, list[float], dict]:
    """``clients`` workers share ``total`` calls, each on the next of ``inputs``; returns
    the wall time, the latencies of the successful calls and the errors by kind."""
    remaining = total
    latencies: list[float] = []
    errors: dict[str, int] = {}

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            item = next(inputs)
            started = time.perf_counter()
            error = await call(item)
            if error is None:
                latencies.append(time.perf_counter() - started)
            else:
                errors[error] = errors.get(error, 0) + 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return time.perf_counter() - started, latencies, errors


class Target(abc.ABC):
    """Something to send the standard request to: ``call(item)`` -> None or an error kind."""

    mode: str

    @abc.abstractmethod
    async def call(self, item: Any) -> str | None: ...

    @abc.abstractmethod
    def prepare(self, jpeg: bytes) -> Any:
        """The per-request input made from one image, outside the timing."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook; most targets hold nothing
        pass


class HttpTarget(Target):
    def __init__(self, mode: str, url: str, key: str) -> None:
        import httpx

        self.mode = mode
        self.http = httpx.AsyncClient(
            base_url=url,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            timeout=300,
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=256),
        )

    def prepare(self, jpeg: bytes) -> bytes:
        return request_body(jpeg)

    async def call(self, item: bytes) -> str | None:
        import httpx

        try:
            response = await self.http.post("/v1/chat/completions", content=item)
        except httpx.HTTPError as exc:
            return type(exc).__name__
        if response.status_code != 200:
            return f"{response.status_code} {response.json()['error']['code']}"
        return None

    async def aclose(self) -> None:
        await self.http.aclose()


class EngineTarget(Target):
    """The floor: the request through the in-process inference client, no HTTP."""

    mode = "engine"

    def __init__(self, model_dir: Path, torch_threads: int) -> None:
        import torch

        from inference.client import build_inference_client

        torch.set_num_threads(torch_threads)  # as OMP_NUM_THREADS gives the servers
        from inference.transports.base import InferenceSettings

        self.client = build_inference_client(
            InferenceSettings(transport="inprocess", models={MODEL: model_spec(model_dir)})
        )

    def prepare(self, jpeg: bytes) -> tuple[bytes, Any]:
        """What validation hands the engine: the pixels re-encoded as RGB PNG."""
        from PIL import Image

        from inference.protocol import ImageRef

        image = Image.open(io.BytesIO(jpeg)).convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        png = buffer.getvalue()
        sha = hashlib.sha256(png).hexdigest()
        return png, ImageRef(sha256=sha, width=image.width, height=image.height)

    async def call(self, item: tuple[bytes, Any]) -> str | None:
        from inference.protocol import (
            DoneEvent,
            ErrorEvent,
            ImagePart,
            InferenceRequest,
            Message,
            SamplingParams,
            TextPart,
            new_request_id,
        )

        png, ref = item
        await self.client.put_image(tenant_id="bench", data=png, ref=ref)
        request = InferenceRequest(
            request_id=new_request_id(),
            tenant_id="bench",
            model=MODEL,
            messages=[Message(role="user", content=[ImagePart(image=ref), TextPart(QUESTION)])],
            sampling=SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
            stream=False,
        )
        async for event in self.client.submit(request):
            if isinstance(event, ErrorEvent):
                return event.code.value
            if isinstance(event, DoneEvent):
                return None
        return "no terminal event"

    async def aclose(self) -> None:
        await self.client.aclose()


async def measure(target: Target, clients: int, jpegs: Iterator[bytes], total: int) -> Result:
    inputs = iter([target.prepare(next(jpegs)) for _ in range(total)])
    wall, latencies, errors = await closed_loop(clients, inputs, total, target.call)
    return Result(target.mode, clients, total, wall, latencies, errors)


def requests_for(clients: int, args: Any) -> int:
    return max(args.min_requests, clients * args.requests_per_client)


def print_result(r: Result) -> None:
    errors = ", ".join(f"{k} x{v}" for k, v in r.errors.items()) or "-"
    print(
        f"{r.mode:<9} {r.clients:>7} {r.requests:>8} {r.rps:>8.1f} "
        f"{r.percentile_ms(0.5):>9.1f} {r.percentile_ms(0.99):>9.1f}  {errors}",
        flush=True,
    )


# --- servers ----------------------------------------------------------------------------


def model_spec(model_dir: Path) -> dict[str, str]:
    return {"path": str(model_dir), "dtype": "float32", "device": "cpu"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def base_env(tmp: Path, model_dir: Path, args: Any, *, mode: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "REDIS_URL", "CLAMD_URL", "CLAMD_REQUIRED")
        and not k.startswith(("INFERENCE_", "CACHE_", "TEST_DATABASE"))
    }
    var_dir = tmp / f"var-{mode}"
    var_dir.mkdir(exist_ok=True)
    env.update(
        PYTHONPATH=os.pathsep.join([str(tmp), str(REPO)]),
        DJANGO_SETTINGS_MODULE="bench_settings",
        PLATFORM_VAR_DIR=str(var_dir),
        DJANGO_SECRET_KEY=args.secret,
        API_KEY_HMAC_SECRET=args.secret,
        INFERENCE_MODELS=json.dumps({MODEL: model_spec(model_dir)}),
        BENCH_QUOTA_KEY_PREFIX=f"{args.prefix}-quota",
        # Measure throughput, not degradation: by default 64 clients on one worker with 8
        # batch slots would get part of their requests refused as model_overloaded.
        MODEL_MAX_QUEUE_PER_SLOT=str(args.queue_per_slot),
        LOG_LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS=str(args.torch_threads),
    )
    if args.clamd_url:
        env.update(CLAMD_URL=args.clamd_url, CLAMD_REQUIRED="1")
    else:
        env.update(CLAMD_REQUIRED="0")
    return env


def run_checked(command: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def provision(env: dict[str, str]) -> str:
    """Migrate the mode's database and create a tenant with generous limits; its raw key."""
    out = run_checked([sys.executable, str(Path(__file__).resolve()), "provision"], env)
    return json.loads(out.strip().splitlines()[-1])["key"]


@contextlib.contextmanager
def process(command: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_ready(url: str, proc: subprocess.Popen, log: Path, *, path: str) -> None:
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + path, timeout=5).status_code == 200:
                return
        time.sleep(0.25)
    raise RuntimeError(f"{url}{path} not ready:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def uvicorn_server(env: dict[str, str], tmp: Path, mode: str) -> Iterator[str]:
    port = free_port()
    log = tmp / f"uvicorn-{mode}.log"
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "webplatform.asgi:application",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--lifespan",
        "off",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    url = f"http://127.0.0.1:{port}"
    with process(command, env, log) as proc:
        wait_ready(url, proc, log, path="/health/live")
        yield url


@contextlib.contextmanager
def scratch_postgres(server_url: str, name: str) -> Iterator[str]:
    import psycopg

    parts = urlsplit(server_url)
    admin = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def redis_namespace(redis_url: str, prefixes: list[str]) -> Iterator[None]:
    import redis

    try:
        yield
    finally:
        client = redis.Redis.from_url(redis_url)
        for prefix in prefixes:
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            if keys:
                client.delete(*keys)
        client.close()


@contextlib.contextmanager
def embedded_target(tmp: Path, model_dir: Path, args: Any) -> Iterator[tuple[str, str]]:
    env = base_env(tmp, model_dir, args, mode="embedded")
    key = provision(env)
    with uvicorn_server(env, tmp, "embedded") as url:
        yield url, key


@contextlib.contextmanager
def redis_target(tmp: Path, model_dir: Path, args: Any) -> Iterator[tuple[str, str]]:
    env = base_env(tmp, model_dir, args, mode="redis")
    env.update(
        REDIS_URL=args.redis_url,
        CACHE_KEY_PREFIX=f"{args.prefix}-cache",
        INFERENCE_KEY_PREFIX=f"{args.prefix}-inference",
        CHANNEL_PREFIX=f"{args.prefix}-asgi",
    )
    prefixes = [f"{args.prefix}-{part}" for part in ("cache", "inference", "asgi", "quota")]
    database = f"bench_api_{args.prefix.split('-')[-1]}"
    with (
        scratch_postgres(args.database_url, database) as database_url,
        redis_namespace(args.redis_url, prefixes),
    ):
        env["DATABASE_URL"] = database_url
        key = provision(env)
        worker_log = tmp / "worker.log"
        worker = [sys.executable, "manage.py", "inference_worker", "--model", MODEL]
        with (
            process(worker, env, worker_log) as worker_process,
            uvicorn_server(env, tmp, "redis") as url,
        ):
            wait_ready(url, worker_process, worker_log, path="/health/ready")
            yield url, key


def provision_command() -> None:
    """``benchmarks/api.py provision``: run inside a mode's environment (a subprocess)."""
    import django

    django.setup()
    from django.core.management import call_command

    from tenants.models import Plan
    from tenants.services.api_keys import api_key_create
    from tenants.services.tenants import tenant_create

    call_command("migrate", verbosity=0, interactive=False)
    plan = Plan.objects.create(
        name=f"bench-{uuid.uuid4().hex[:8]}",
        requests_per_minute=1_000_000,
        tokens_per_day=10**12,
        concurrent_requests=10_000,
        max_output_tokens=64,
    )
    tenant = tenant_create(name="Benchmark", plan=plan, slug=f"bench-{uuid.uuid4().hex[:8]}")
    print(json.dumps({"key": api_key_create(tenant=tenant, name="bench").raw_key}))


def best(results: list[Result]) -> list[Result]:
    """Per mode and client count, the round with the most requests/s (the least disturbed
    by other load on the machine), in mode then client order."""
    chosen: dict[tuple[str, int], Result] = {}
    for r in results:
        key = (r.mode, r.clients)
        if key not in chosen or r.rps > chosen[key].rps:
            chosen[key] = r
    return list(chosen.values())


def summary(results: list[Result]) -> None:
    by_key = {(r.mode, r.clients): r for r in results}
    print("\nplatform overhead (HTTP mode / engine alone, same clients):")
    print(f"{'mode':<9} {'clients':>7} {'p50 x':>7} {'p99 x':>7} {'rps x':>7} {'+p50 ms':>8}")
    for r in results:
        floor = by_key.get(("engine", r.clients))
        if r.mode == "engine" or floor is None or not r.latencies_s:
            continue
        print(
            f"{r.mode:<9} {r.clients:>7} "
            f"{r.percentile_ms(0.5) / floor.percentile_ms(0.5):>7.2f} "
            f"{r.percentile_ms(0.99) / floor.percentile_ms(0.99):>7.2f} "
            f"{floor.rps / r.rps:>7.2f} "
            f"{r.percentile_ms(0.5) - floor.percentile_ms(0.5):>8.1f}"
        )
    print("(p50 x, p99 x: latency ratios; rps x: engine requests/s over HTTP requests/s)")


HEADER = f"{'mode':<9} {'clients':>7} {'requests':>8} {'req/s':>8} {'p50 ms':>9} {'p99 ms':>9}"


async def main(args: Any) -> None:
    args.secret = secrets.token_urlsafe(32)
    args.prefix = f"bench-api-{uuid.uuid4().hex[:10]}"
    args.clamd_url = args.clamd_url or os.environ.get("CLAMD_URL", "")
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "bench_settings.py").write_text(BENCH_SETTINGS)
        if args.model_dir:
            model_dir = Path(args.model_dir)
        else:
            # In a subprocess: training the tiny model leaves this process's torch slower
            # (the engine-alone floor measured 10x slower after an in-process build).
            model_dir = tmp / "tiny-glm4v"
            build = (
                "import sys, torch; from inference.tiny_model import build_tiny_model; "
                "torch.manual_seed(0); build_tiny_model(sys.argv[1], seed=0)"
            )
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            run_checked([sys.executable, "-c", build, str(model_dir)], env)
        per_round = sum(requests_for(c, args) for c in args.clients)
        # Every request of a mode gets an image no request of that mode had before.
        jpegs = distinct_jpegs(WARM_UP_REQUESTS + args.rounds * per_round)
        body = request_body(jpegs[0])
        print(
            f"request: {len(jpegs[0]) / 1000:.0f} KB JPEG ({len(body) / 1000:.0f} KB body), "
            f"a different image each time, max_tokens {MAX_TOKENS}, greedy, cache off; "
            f"ClamAV {'on (' + args.clamd_url + ')' if args.clamd_url else 'off'}; "
            f"max({args.min_requests}, {args.requests_per_client} x clients) requests per "
            f"level; {args.rounds} rounds, modes and levels interleaved",
            flush=True,
        )
        with contextlib.ExitStack() as stack:
            targets: list[Target] = []
            for mode in args.modes:
                if mode == "engine":
                    targets.append(EngineTarget(model_dir, args.torch_threads))
                elif mode == "embedded":
                    url, key = stack.enter_context(embedded_target(tmp, model_dir, args))
                    targets.append(HttpTarget(mode, url, key))
                else:
                    url, key = stack.enter_context(redis_target(tmp, model_dir, args))
                    targets.append(HttpTarget(mode, url, key))
            try:
                results = await run_rounds(targets, jpegs, args)
            finally:
                for target in targets:
                    await target.aclose()
        print(f"\nbest of {args.rounds} rounds (by requests/s):")
        print(HEADER)
        chosen = best(results)
        for r in chosen:
            print_result(r)
        summary(chosen)


async def run_rounds(targets: list[Target], jpegs: list[bytes], args: Any) -> list[Result]:
    streams = {t.mode: iter(jpegs) for t in targets}
    for target in targets:  # loads the model, opens connections, fills process caches
        await measure(target, 1, streams[target.mode], WARM_UP_REQUESTS)
    print(HEADER)
    results = []
    for _ in range(args.rounds):
        for clients in args.clients:
            for target in targets:
                total = requests_for(clients, args)
                result = await measure(target, clients, streams[target.mode], total)
                results.append(result)
                print_result(result)
    return results


def parse_args() -> Any:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["engine", "embedded", "redis"],
        choices=["engine", "embedded", "redis"],
    )
    parser.add_argument("--requests-per-client", type=int, default=1)
    parser.add_argument("--min-requests", type=int, default=16, help="per client count")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch (OpenMP) threads of every engine; more than the free cores makes OpenMP "
        "spin against the other processes and collapses all figures on a shared machine",
    )
    parser.add_argument(
        "--queue-per-slot",
        type=int,
        default=1000,
        help="MODEL_MAX_QUEUE_PER_SLOT of the servers (the platform default, 4, refuses "
        "part of 64 clients' requests with 503 model_overloaded)",
    )
    parser.add_argument(
        "--database-url",
        default="postgres://postgres@127.0.0.1:5432/test",
        help="PostgreSQL server for the scratch database (its name is replaced)",
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/3")
    parser.add_argument("--clamd-url", default="", help="default: $CLAMD_URL; none: no scan")
    parser.add_argument("--model-dir", default="", help="an existing tiny checkpoint")
    return parser.parse_args()


if __name__ == "__main__":
    if sys.argv[1:2] == ["provision"]:
        provision_command()
    else:
        asyncio.run(main(parse_args()))
