"""The HTTP setups under test, and the tiny checkpoint every setup serves.

- ``embedded``: uvicorn in the embedded mode (SQLite file in a temp dir, process-local cache
  and quotas, in-process inference);
- ``redis``: the production wiring: uvicorn on PostgreSQL (a scratch database created and
  dropped here) and Redis (cache, quotas, Redis Streams queue, all under unique key
  prefixes deleted afterwards), plus one ``python -m inference.worker``.

Each setup is a context manager yielding its URL and an API key; it runs with
``bench_settings`` (``BENCH_SETTINGS``, written into the temp dir by the caller).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .processes import REPO, process, run_checked, uvicorn_server, wait_ready
from .provision import provision
from .request import MODEL, model_spec

BENCH_SETTINGS = '''
"""Benchmark settings: the project's, plus what has no environment variable."""
import os

from webplatform.settings import *  # noqa: F403

QUOTA_KEY_PREFIX = os.environ["BENCH_QUOTA_KEY_PREFIX"]
'''


def build_tiny_model(model_dir: Path) -> None:
    """The tiny checkpoint into ``model_dir``, built in a subprocess: training the tiny model
    leaves this process's torch slower (the engine-alone floor measured 10x slower after an
    in-process build)."""
    build = (
        "import sys, torch; from inference.tiny_model import build_tiny_model; "
        "torch.manual_seed(0); build_tiny_model(sys.argv[1], seed=0)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run_checked([sys.executable, "-c", build, str(model_dir)], env)


def clamd_url_of(option: str, environ: Mapping[str, str]) -> str:
    """The scanner the servers get: ``--clamd-url``, else ``$CLAMD_URL``; ``none`` (either
    way): no scan, and the servers run with ``CLAMD_REQUIRED=0`` (``base_env``)."""
    url = option or environ.get("CLAMD_URL", "")
    return "" if url.strip().lower() == "none" else url


def base_env(tmp: Path, model_dir: Path, args: argparse.Namespace, *, mode: str) -> dict[str, str]:
    """The environment of a setup's processes: this one's, less every setting the benchmark
    decides, plus the benchmark's."""
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


@contextlib.contextmanager
def scratch_postgres(server_url: str, name: str) -> Iterator[str]:
    """Database ``name`` created on the server of ``server_url`` for the block, then dropped;
    its URL."""
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
    """On the way out, delete every key under ``prefixes``."""
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
def embedded_target(
    tmp: Path, model_dir: Path, args: argparse.Namespace
) -> Iterator[tuple[str, str]]:
    """The ``embedded`` setup, live for the block: its URL and an API key."""
    env = base_env(tmp, model_dir, args, mode="embedded")
    key = provision(env)
    with uvicorn_server(env, tmp, "embedded") as url:
        yield url, key


@contextlib.contextmanager
def redis_target(tmp: Path, model_dir: Path, args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """The ``redis`` setup, live for the block: its URL (once the worker is ready too) and
    an API key."""
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
        worker = [sys.executable, "-m", "inference.worker", "--model", MODEL]
        with (
            process(worker, env, worker_log) as worker_process,
            uvicorn_server(env, tmp, "redis") as url,
        ):
            wait_ready(url, worker_process, worker_log, path="/health/ready")
            yield url, key
