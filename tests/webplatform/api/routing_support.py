"""Real upstreams for the routing tests: a second instance of this platform, and a small
HTTP server that misbehaves on purpose.

- ``upstream_platform``: the platform's own ASGI app on a second uvicorn server (real HTTP,
  real SSE) in this test process, serving the tiny model in-process; the first instance
  (``live_asgi_server``) serves ``glm-4.6v-large`` as an ``openai-upstream`` model whose
  ``base_url`` is this server and whose key belongs to another tenant ("the upstream
  operator"). Both servers share the process's settings and the test database, as two
  platform processes of one deployment would share a database.
- ``fault_server``: a raw ASGI app on uvicorn. The first path segment says how it answers:
  ``/500/v1/...`` HTTP 500, ``/slow/v1/...`` nothing for 30 s, ``/malformed/v1/...`` an SSE
  stream whose data is not JSON, ``/cut/v1/...`` two tokens then a broken chunk, and
  ``/unsure/v1/...`` a well-formed answer whose tokens have a log-probability of -3 (an
  upstream fast model that is not sure), ``/drip/v1/...`` a token every 50 ms. It counts
  the requests of each mode.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.webplatform.live_server import LiveServer, _ThreadedUvicorn

FAST = "glm-4.6v-flash"
LARGE = "glm-4.6v-large"


def serve(app: Any) -> tuple[_ThreadedUvicorn, socket.socket, str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    thread = _ThreadedUvicorn(app, sock)
    thread.start()
    deadline = time.monotonic() + 20
    while not thread.server.started:
        if thread.error is not None or not thread.is_alive():
            raise RuntimeError(f"server did not start: {thread.error!r}")
        assert time.monotonic() < deadline, "server did not start in time"
        time.sleep(0.01)
    return thread, sock, f"http://127.0.0.1:{sock.getsockname()[1]}"


@dataclass
class FaultApp:
    hits: Counter[str] = field(default_factory=Counter)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    disconnected: Counter[str] = field(default_factory=Counter)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        mode = scope["path"].strip("/").split("/")[0]
        self.hits[mode] += 1
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(json.loads(raw or b"{}"))
        if mode == "500":
            await send({"type": "http.response.start", "status": 500, "headers": []})
            await send({"type": "http.response.body", "body": b"upstream secret trace"})
            return
        if mode == "slow":
            await asyncio.sleep(30)
            return
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})

        def chunk(text: str, logprob: float | None = None, finish: str | None = None) -> bytes:
            choice: dict[str, Any] = {"index": 0, "delta": {"content": text}}
            if logprob is not None:
                choice["logprobs"] = {"content": [{"token": text, "logprob": logprob}]}
            choice["finish_reason"] = finish
            return f"data: {json.dumps({'choices': [choice]})}\n\n".encode()

        if mode == "malformed":
            body = b"data: {this is not json\n\n"
            await send({"type": "http.response.body", "body": body})
            return
        if mode == "cut":
            for word in ("Hello", " there"):
                await send({"type": "http.response.body", "body": chunk(word), "more_body": True})
            await send({"type": "http.response.body", "body": b"data: {broken\n\n"})
            return
        if mode == "drip":  # a token every 50 ms, 200 of them, until the client goes
            gone = asyncio.Event()

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone.set()

            watcher = asyncio.create_task(watch())
            try:
                for i in range(200):
                    if gone.is_set():
                        self.disconnected[mode] += 1
                        return
                    body = chunk(f" w{i}")
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                    await asyncio.sleep(0.05)
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
            except (OSError, asyncio.CancelledError):
                self.disconnected[mode] += 1
                raise
            finally:
                watcher.cancel()
            return
        if mode == "unsure":
            parts = [chunk(w, -3.0) for w in ("It", " is", " blue")]
            parts.append(chunk("", None, "stop"))
            usage = {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 3}}
            parts.append(f"data: {json.dumps(usage)}\n\n".encode())
            parts.append(b"data: [DONE]\n\n")
            await send({"type": "http.response.body", "body": b"".join(parts)})
            return
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


@pytest.fixture
def fault_server() -> Iterator[tuple[FaultApp, str]]:
    app = FaultApp()
    thread, sock, url = serve(app)
    try:
        yield app, url
    finally:
        thread.server.force_exit = True
        thread.stop()
        sock.close()


@dataclass(frozen=True)
class Upstream:
    url: str
    tenant: Any
    key_file: str


@pytest.fixture
def upstream_platform(live_asgi_server: LiveServer, tmp_path) -> Iterator[Upstream]:
    """A second instance of the platform, and a key of its own operator's tenant."""
    from tests.factories import PlanFactory, TenantFactory, api_key_for

    tenant = TenantFactory(plan=PlanFactory(name="upstream-operator", concurrent_requests=8))
    key_file = tmp_path / "upstream.key"
    key_file.write_text(api_key_for(tenant).raw_key + "\n")
    from webplatform.asgi import application

    thread, sock, url = serve(application)
    try:
        yield Upstream(url=url, tenant=tenant, key_file=str(key_file))
    finally:
        thread.stop()
        sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def upstream_spec(base_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "openai-upstream",
        "base_url": base_url,
        "model": FAST,
        "timeout_s": 30,
        "max_concurrency": 4,
        "max_retries": 1,
        "retry_backoff_s": 0.05,
        # This platform refuses logprobs (it does not compute them).
        "logprobs": False,
        **extra,
    }
