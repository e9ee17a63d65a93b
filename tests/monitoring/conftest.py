"""A worker PROCESS for the monitoring tests: the tiny GLM-4.6V model on the CPU, on its
own key prefix in the real Redis, serving /metrics, /ready and /live on a free port and
writing JSON log lines to a file. One per session (loading the model dominates the cost);
``web`` points the live web server (tests.webplatform.live_server) at it.
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
from pathlib import Path

import httpx
import pytest

from tests.factories import api_key_for
from tests.inference.fakes import delete_prefix, redis_url_for_tests

ROOT = Path(__file__).resolve().parents[2]
MODEL = "glm-4.6v-flash"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WorkerProcess:
    def __init__(self, *, url: str, prefix: str, model_dir: Path, log_path: Path) -> None:
        self.metrics_port = free_port()
        self.log_path = log_path
        env = {
            **os.environ,
            "INFERENCE_REDIS_URL": url,
            "INFERENCE_KEY_PREFIX": prefix,
            "INFERENCE_MODELS": json.dumps(
                {MODEL: {"path": str(model_dir), "dtype": "float32", "device": "cpu"}}
            ),
            "INFERENCE_HEARTBEAT_SECONDS": "0.3",
            "INFERENCE_METRICS_PORT": str(self.metrics_port),
            "LOG_FORMAT": "json",
        }
        argv = [sys.executable, "-m", "inference.worker", "--model", MODEL]
        argv += ["--metrics-host", "127.0.0.1", "--max-batch-size", "4"]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=log)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"worker exited:\n{self.log()}"
            try:
                if httpx.get(self.base + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"worker not ready:\n{self.log()}"
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="session")
def worker(request, tmp_path_factory):
    url = redis_url_for_tests()
    if url is None:
        pytest.fail("needs REDIS_URL pointing at a reachable Redis (make test sets it)")
    from tests.webplatform.live_server import tiny_model_path

    prefix = f"test-monitoring-{uuid.uuid4().hex[:10]}"
    proc = WorkerProcess(
        url=url,
        prefix=prefix,
        model_dir=tiny_model_path(request.config),
        log_path=tmp_path_factory.mktemp("worker") / "worker.log",
    )
    try:
        proc.wait_ready()
        proc.prefix = prefix  # type: ignore[attr-defined]
        yield proc
    finally:
        proc.stop()
        delete_prefix(url, prefix)


@pytest.fixture
def web(live_asgi_server, worker, settings, owner):
    """The live web server sending to ``worker`` over Redis, and an API key of ``owner``."""
    from inference.client import reset_inference_client

    settings.INFERENCE_TRANSPORT = "redis"
    settings.INFERENCE_REDIS_URL = redis_url_for_tests()
    settings.INFERENCE_KEY_PREFIX = worker.prefix
    settings.INFERENCE_MODELS = {MODEL: live_asgi_server.models[MODEL]}
    reset_inference_client()
    yield live_asgi_server, api_key_for(owner.tenant).raw_key
    reset_inference_client()
