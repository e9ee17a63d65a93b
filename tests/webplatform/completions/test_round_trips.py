"""Redis round trips the web side makes for one request before a worker sees it.

A chat completion with an image through the live server on the Redis Streams transport,
answered by a stand-in worker (the real worker half of the transport, in a thread, with no
engine). Every command or pipeline redis-py sends from the web side is one round trip; the
count runs from the HTTP request to the web's first read of the reply stream, which comes
after the enqueue. What it may hold: the API key's cache, the quota script, the enqueue
(blobs + XADD in one script), and routing's health read when its short cache has expired.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import redis.asyncio.connection as async_connection
import redis.connection as sync_connection
from PIL import Image

from inference.client.factory import inference_settings
from inference.worker.redis_streams import RedisWorkerTransport
from inference.worker.transport import Outgoing
from tests.factories import TenantFactory, api_key_for
from tests.inference.fakes import SAMPLE_EVENTS, make_heartbeat

pytest_plugins = ["tests.webplatform.live_server"]

MODEL = "glm-4.6v-flash"


class _Sends:
    """Each command or pipeline redis-py sends (sync and asyncio clients), with its thread."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sends: list[tuple[int, bytes]] = []
        self.counting = False
        for module in (sync_connection, async_connection):
            self._wrap(monkeypatch, module.AbstractConnection)

    def _wrap(self, monkeypatch: pytest.MonkeyPatch, cls: type) -> None:
        original = cls.send_packed_command
        sends = self

        def head(command: object) -> bytes:
            chunks = [command] if isinstance(command, bytes | str) else list(command)  # type: ignore[call-overload]
            first = chunks[0] if chunks else b""
            return (first.encode() if isinstance(first, str) else bytes(first))[:64]

        if cls is async_connection.AbstractConnection:

            async def send(conn, command, check_health=True):  # type: ignore[no-untyped-def]
                if sends.counting:
                    sends.sends.append((threading.get_ident(), head(command)))
                return await original(conn, command, check_health)
        else:

            def send(conn, command, check_health=True):  # type: ignore[no-untyped-def]
                if sends.counting:
                    sends.sends.append((threading.get_ident(), head(command)))
                return original(conn, command, check_health)

        monkeypatch.setattr(cls, "send_packed_command", send)

    def before_reply_read(self, *, not_from: int) -> list[bytes]:
        """The web side's sends up to its first XREAD (the reply stream), excluded."""
        mine = [cmd for ident, cmd in self.sends if ident != not_from]
        for index, cmd in enumerate(mine):
            if b"XREAD" in cmd:
                return mine[:index]
        raise AssertionError(f"the web side never read the reply stream: {mine}")


class _StandInWorker(threading.Thread):
    """Heartbeats, takes each request and answers it with ``SAMPLE_EVENTS``."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        settings = inference_settings()
        self.transport = RedisWorkerTransport.from_url(
            settings.redis_url, settings=settings, model=MODEL, worker_id="stand-in"
        )
        self.transport.setup()
        self.transport.heartbeat(make_heartbeat("stand-in", model=MODEL))
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            self.transport.heartbeat(make_heartbeat("stand-in", model=MODEL))
            for delivery in self.transport.fetch(4, 100):
                out = Outgoing(delivery.request.request_id, SAMPLE_EVENTS, ack_token=delivery.token)
                self.transport.publish([out])


@pytest.fixture
def stand_in_worker(redis_inference_without_workers, settings) -> Iterator[_StandInWorker]:
    worker = _StandInWorker()
    worker.start()
    yield worker
    worker.stopping.set()
    worker.join(5)


def _jpeg(seed: int) -> str:
    image = Image.new("RGB", (320, 240), (seed % 256, 90, 160))
    out = io.BytesIO()
    image.save(out, format="JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


def _ask(http: httpx.Client, seed: int) -> httpx.Response:
    return http.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "max_tokens": 20,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": _jpeg(seed)}},
                        {"type": "text", "text": "What is this?"},
                    ],
                }
            ],
        },
    )


@pytest.mark.parametrize(
    ("health_cache_s", "most"),
    [(60.0, 3), (0.0, 4)],  # key cache, quota script, (health script,) enqueue script
    ids=["routing health cached", "routing health read"],
)
def test_round_trips_before_the_worker_sees_the_request(
    live_asgi_server, stand_in_worker, settings, monkeypatch, health_cache_s, most
):
    from inference.client import reset_inference_client

    settings.INFERENCE_MODELS = {MODEL: live_asgi_server.models[MODEL]}
    settings.INFERENCE_HEALTH_CACHE_SECONDS = health_cache_s
    reset_inference_client()
    key = api_key_for(TenantFactory()).raw_key
    sends = _Sends(monkeypatch)
    with httpx.Client(
        base_url=live_asgi_server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    ) as http:
        # The first request opens connections and loads scripts; the second is measured.
        assert _ask(http, 1).status_code == 200
        time.sleep(0.05)
        sends.counting = True
        response = _ask(http, 2)
        sends.counting = False

    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"].startswith("w0 w1")
    before = sends.before_reply_read(not_from=stand_in_worker.ident or 0)
    assert len(before) == most, before
