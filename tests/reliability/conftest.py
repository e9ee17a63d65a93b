"""Fault tests: a Redis each module starts and kills itself (``redis-server`` on a free port,
never the shared one), real worker processes (``python -m inference.worker``, the tiny model
on the CPU) and the live web server (``tests.webplatform.live_server``, uvicorn in a thread
of this process) with every web-side Redis user pointed at that Redis: the Django cache (API
keys, answer cache), the quota store and the inference client.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from tests.factories import api_key_for

ROOT = Path(__file__).resolve().parents[2]
MODEL = "glm-4.6v-flash"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A throw-away ``redis-server`` (no persistence) the test may kill, hang and restart."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        self.start()

    def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=self.port, socket_timeout=1).ping()
                return
            except redis.RedisError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=2)

    def kill(self) -> None:
        """SIGKILL: every connection drops, every key is gone."""
        assert self.proc is not None
        if self.paused:
            self.resume()
        self.proc.kill()
        self.proc.wait(10)

    def restart(self) -> None:
        """Killed (if running) and started again on the same port, empty."""
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts TCP connections; nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def ensure_running(self) -> None:
        if self.paused:
            self.resume()
        if self.proc is None or self.proc.poll() is not None:
            self.start()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


class WorkerProcess:
    """``python -m inference.worker`` for the tiny model against ``url``, id ``worker_id``."""

    def __init__(
        self, *, url: str, prefix: str, worker_id: str, model_dir: Path, log_path: Path
    ) -> None:
        self.worker_id = worker_id
        self.metrics_port = free_port()
        self.log_path = log_path
        env = {
            **os.environ,
            "INFERENCE_REDIS_URL": url,
            "INFERENCE_KEY_PREFIX": prefix,
            "INFERENCE_MODELS": json.dumps(
                {MODEL: {"path": str(model_dir), "dtype": "float32", "device": "cpu"}}
            ),
            "INFERENCE_METRICS_PORT": str(self.metrics_port),
        }
        # The liveness defaults under test, not whatever the calling shell sets.
        for name in ("INFERENCE_HEARTBEAT_SECONDS", "INFERENCE_CLAIM_IDLE_MS", "REDIS_URL"):
            env.pop(name, None)
        argv = [sys.executable, "-m", "inference.worker", "--model", MODEL]
        argv += ["--worker-id", worker_id, "--metrics-host", "127.0.0.1"]
        argv += ["--max-batch-size", "4"]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=log)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.metrics_port}/ready"
        while True:
            assert self.proc.poll() is None, f"worker exited:\n{self.log()}"
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"worker not ready:\n{self.log()}"
            time.sleep(0.1)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def fault_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def fault_workers(request, fault_redis, tmp_path_factory) -> Iterator[list[WorkerProcess]]:
    """Two workers of the tiny model, started together (loading dominates: ~15 s)."""
    from tests.webplatform.live_server import tiny_model_path

    prefix = f"test-faults-{uuid.uuid4().hex[:8]}"
    logs = tmp_path_factory.mktemp("fault-workers")
    workers = [
        WorkerProcess(
            url=fault_redis.url,
            prefix=prefix,
            worker_id=f"w{i}",
            model_dir=tiny_model_path(request.config),
            log_path=logs / f"w{i}.log",
        )
        for i in range(2)
    ]
    try:
        for worker in workers:
            worker.wait_ready()
        for worker in workers:
            worker.prefix = prefix  # type: ignore[attr-defined]
        yield workers
    finally:
        fault_redis.ensure_running()
        for worker in workers:
            worker.stop()


@dataclass
class FaultWeb:
    url: str
    key: str
    redis: RedisServer
    workers: list[WorkerProcess]
    prefix: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def wait_ready(self, timeout: float = 15) -> None:
        """Until /health/ready says 200 (Redis answers and a worker is registered)."""
        deadline = time.monotonic() + timeout
        while httpx.get(self.url + "/health/ready", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the web side did not become ready"
            time.sleep(0.1)


@pytest.fixture
def fault_web(live_asgi_server, fault_redis, fault_workers, settings, owner) -> Iterator[FaultWeb]:
    """The live web server with every Redis user on ``fault_redis``; a key of ``owner``,
    whose plan allows bursts."""
    from django.conf import settings as live_settings

    from inference.client import reset_inference_client

    fault_redis.ensure_running()
    original_redis_url = live_settings.REDIS_URL
    cache = dict(live_settings.CACHES["default"])
    cache["LOCATION"] = fault_redis.url
    settings.CACHES = {"default": cache}
    settings.REDIS_URL = fault_redis.url
    settings.QUOTA_BACKEND = "redis"
    settings.INFERENCE_TRANSPORT = "redis"
    settings.INFERENCE_REDIS_URL = fault_redis.url
    settings.INFERENCE_KEY_PREFIX = fault_workers[0].prefix
    settings.INFERENCE_MODELS = {MODEL: live_asgi_server.models[MODEL]}
    reset_inference_client()
    plan = owner.tenant.plan
    plan.requests_per_minute = 10_000
    plan.concurrent_requests = 64
    plan.save()
    web = FaultWeb(
        url=live_asgi_server.url,
        key=api_key_for(owner.tenant).raw_key,
        redis=fault_redis,
        workers=fault_workers,
        prefix=fault_workers[0].prefix,
    )
    yield web
    fault_redis.ensure_running()
    reset_inference_client()
    settings.REDIS_URL = original_redis_url  # the quota fixture's clean-up reads it
