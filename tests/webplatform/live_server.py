"""A live ASGI server for end-to-end tests: uvicorn in a thread of the test process.

The whole platform (``webplatform.asgi.application``: HTTP and websockets) listens on a free
port of 127.0.0.1, on the test database, with the embedded in-process inference transport
serving the real tiny GLM-4.6V checkpoint. Clients that speak real HTTP or websockets (the
``openai`` SDK, ``httpx``, ``websockets``) talk to it exactly as they would in production.

Usage, in a test module (load this module as a plugin; its fixtures are then available)::

    pytest_plugins = ["tests.webplatform.live_server"]

    def test_answer(live_asgi_server, owner):
        key = api_key_for(owner.tenant).raw_key
        httpx.post(live_asgi_server.url + "/v1/chat/completions", ...)
        websockets.connect(live_asgi_server.ws_url + "/ws/chat/?ticket=...")

What the fixture guarantees (stable API):

- ``live_asgi_server.url``: ``http://127.0.0.1:PORT``; ``.ws_url``: ``ws://127.0.0.1:PORT``;
  ``.models``: the ``INFERENCE_MODELS`` it serves: ``glm-4.6v-flash`` (the tiny checkpoint,
  float32 on CPU) and ``ocr-lite`` (the OCR fallback engine; loaded only if a request uses
  it); ``.model_dir``: the tiny checkpoint's folder; ``.inference_client()``: the server's
  in-process ``InferenceClient`` (engine stats, ``model_health``).
- It needs ``transactional_db`` (requested for you): the server's threads use their own
  database connections, so rows a test creates must be committed to be seen.
- Settings are changed through pytest-django's ``settings`` fixture before the first request
  (``INFERENCE_TRANSPORT="inprocess"``, ``INFERENCE_MODELS``, a fresh
  ``ANSWER_CACHE_KEY_PREFIX``)
  and ``inference.client.reset_inference_client()`` runs before and after, so every test gets
  fresh engine threads. A test may change other settings (``settings.X = ...``) at any time;
  they are process-wide, so the server sees them at once. If it changes
  ``INFERENCE_MODELS`` it must call ``reset_inference_client()`` itself.

``redis_inference_without_workers`` (needs ``live_asgi_server``) switches the server to the
Redis Streams transport in a fresh key namespace where no worker runs: every model is then
unavailable, as in production when all GPU workers are down.

The tiny checkpoint is built once and kept in pytest's cache directory (keyed by the source
of ``inference/tiny_model.py``), so only the first run after a change pays the ~15 s build.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "LiveServer",
    "live_asgi_server",
    "redis_inference_without_workers",
    "after_response_drained",
    "content_log_entries",
    "tiny_model_path",
    "usage_records",
]

_START_TIMEOUT_S = 20.0
_build_lock = threading.Lock()


def tiny_model_path(config: pytest.Config) -> Path:
    """The tiny GLM-4.6V checkpoint, built on first use and reused across runs.

    Stored under pytest's cache (``.pytest_cache``) in a folder named by a hash of the
    tiny-model source, written to a temporary folder first and renamed into place, so a
    concurrent run never sees a half-written checkpoint.
    """
    import inference.tiny_model as tiny_model

    source = Path(tiny_model.__file__).read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    root = Path(config.cache.mkdir("live-server"))
    target = root / f"tiny-glm4v-{digest}"
    with _build_lock:
        if (target / "config.json").exists() and (target / "model.safetensors").exists():
            return target
        import torch

        scratch = Path(tempfile.mkdtemp(prefix="tiny-build-", dir=root))
        try:
            torch.manual_seed(0)
            tiny_model.build_tiny_model(scratch, seed=0)
            try:
                os.replace(scratch, target)
            except OSError:  # another run finished first: use its copy
                if not (target / "config.json").exists():
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


@dataclass(frozen=True)
class LiveServer:
    url: str
    ws_url: str
    port: int
    models: dict[str, dict[str, Any]]
    model_dir: Path

    def client_for(self, tenant: Any, *, timeout: float = 60) -> Any:
        """An ``httpx.Client`` of this server, authenticated with a new API key of
        ``tenant`` (close it, or use it as a context manager)."""
        import httpx

        from tests.factories import api_key_for

        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {api_key_for(tenant).raw_key}"},
            timeout=timeout,
        )

    def inference_client(self) -> Any:
        """The server's inference client (in-process: ``.hub``, ``model_health``)."""
        from inference.client import get_inference_client

        return get_inference_client()


class _ThreadedUvicorn(threading.Thread):
    def __init__(self, app: Any, sock: socket.socket) -> None:
        super().__init__(name="live-asgi-server", daemon=True)
        import uvicorn

        config = uvicorn.Config(
            app,
            lifespan="off",  # Django's ASGI app has no lifespan protocol
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=3,
        )
        self.server = uvicorn.Server(config)
        self.sock = sock
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as exc:  # reported by the fixture
            self.error = exc
        finally:
            from django.db import connections

            connections.close_all()

    def stop(self) -> None:
        self.server.should_exit = True
        self.join(15)


def _terminate_other_connections() -> None:
    """Close the server threads' PostgreSQL sessions on the test database, so flushing or
    dropping it never waits on them (threads of uvicorn's executor may die holding one)."""
    from django.db import connection

    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )


@pytest.fixture
def live_asgi_server(
    request: pytest.FixtureRequest, transactional_db, settings
) -> Iterator[LiveServer]:
    from inference.client import reset_inference_client

    model_dir = tiny_model_path(request.config)
    models: dict[str, dict[str, Any]] = {
        "glm-4.6v-flash": {"path": str(model_dir), "dtype": "float32", "device": "cpu"},
        "ocr-lite": {"kind": "ocr-lite"},
    }
    settings.INFERENCE_TRANSPORT = "inprocess"
    settings.INFERENCE_MODELS = models
    settings.ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
    # Tenant ids repeat between runs (a fresh test database each time): without a fresh
    # namespace a test could be answered from an earlier run's cache.
    settings.ANSWER_CACHE_KEY_PREFIX = f"test-answer-{uuid.uuid4().hex[:12]}"
    reset_inference_client()

    from webplatform.asgi import application

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    thread = _ThreadedUvicorn(application, sock)
    thread.start()
    deadline = time.monotonic() + _START_TIMEOUT_S
    while not thread.server.started:
        if thread.error is not None or not thread.is_alive():
            raise RuntimeError(f"the live server did not start: {thread.error!r}")
        if time.monotonic() > deadline:
            thread.stop()
            raise RuntimeError("the live server did not start in time")
        time.sleep(0.01)
    try:
        yield LiveServer(
            url=f"http://127.0.0.1:{port}",
            ws_url=f"ws://127.0.0.1:{port}",
            port=port,
            models=models,
            model_dir=model_dir,
        )
    finally:
        thread.stop()
        sock.close()
        reset_inference_client()
        _terminate_other_connections()


@pytest.fixture
def redis_inference_without_workers(live_asgi_server: LiveServer, settings) -> Iterator[str]:
    """Switch the live server to the Redis Streams transport, in a fresh key namespace where
    no worker of any model runs (the production picture of "every GPU worker is down").
    Yields the key prefix; its keys are deleted afterwards. Fails without ``REDIS_URL``."""
    from inference.client import reset_inference_client

    if not settings.REDIS_URL:
        pytest.fail("This test needs Redis: set REDIS_URL (make test does).")
    prefix = f"test-inference-{uuid.uuid4().hex[:12]}"
    settings.INFERENCE_TRANSPORT = "redis"
    settings.INFERENCE_REDIS_URL = settings.REDIS_URL
    settings.INFERENCE_KEY_PREFIX = prefix
    reset_inference_client()
    yield prefix
    reset_inference_client()
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def after_response_drained(timeout_s: float = 5.0) -> None:
    """Wait until the live server ran every request's after-response work: a served
    answer's usage record and content log are written just after its response
    (``webplatform.after_response``), so a test reads them after this."""
    from webplatform.after_response import after_response_pending

    deadline = time.monotonic() + timeout_s
    while after_response_pending():
        assert time.monotonic() < deadline, "after-response work still pending"
        time.sleep(0.005)


def usage_records() -> Any:
    """``UsageRecord.objects``, once every response's record is written."""
    from tenants.models import UsageRecord

    after_response_drained()
    return UsageRecord.objects


def content_log_entries() -> Any:
    """``ContentLogEntry.objects``, once every response's entry is written."""
    from tenants.models import ContentLogEntry

    after_response_drained()
    return ContentLogEntry.objects
