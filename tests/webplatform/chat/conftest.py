"""Fixtures for the websocket chat tests: the real tiny model in-process, keys, sessions.

``chat_inference`` serves ``glm-4.6v-flash`` (the tiny GLM-4.6V checkpoint, float32 on CPU)
through the embedded in-process transport, whatever ``REDIS_URL`` says; the client and its
engine are shared by the tests of a module (loading costs more than most tests). ``engines``
records every engine in-process worker threads load from then on (the live server's), so a
test can see a slot free (``engines.running``); a module using ``chat_inference`` points
``engines`` at its shared engines. ``paced`` slows each engine step a little:
the tiny model ends most answers within a few dozen tokens, and a cancel test needs the
generation still running when its cancel lands.

Every database test here is transactional: the consumer reads and writes through
``database_sync_to_async`` and the completion service settles in other threads, each on
its own connection, so rows a test makes must be committed to be seen.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.db import connection, connections

from tests.factories import api_key_for
from tests.webplatform.chat.support import FRAME_TIMEOUT_S, MODEL, frames_until_end, wait_for


class PacedEngine:
    """The real engine, with a pause before each step (``delay_s``, settable at any time)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.delay_s = 0.0

    def step(self) -> Any:
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.engine.step()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


@dataclass
class Engines:
    """The engines the in-process worker threads loaded during this test, in order."""

    loaded: list[PacedEngine] = field(default_factory=list)
    step_delay_s: float = 0.0

    def pace(self, delay_s: float) -> None:
        self.step_delay_s = delay_s
        for engine in self.loaded:
            engine.delay_s = delay_s

    @property
    def running(self) -> int:
        return sum(engine.stats().running for engine in self.loaded)

    async def wait_idle(self, timeout_s: float = 5.0) -> int:
        """Wait until no engine runs a request; the number still running at the end."""

        async def idle() -> bool:
            return self.running == 0

        await wait_for(idle, timeout_s=timeout_s)
        return self.running


@pytest.fixture(scope="session", autouse=True)
def _drop_leftover_connections(django_db_setup, django_db_blocker) -> Iterator[None]:
    """End the test database sessions that executor threads of the consumers and the
    completion service left open, so the test database can be dropped at the end."""
    yield
    with django_db_blocker.unblock():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )


def _record_engines(monkeypatch: pytest.MonkeyPatch) -> Engines:
    from inference.client import inprocess

    state = Engines()
    real_load = inprocess.load_engine

    def recording_load(model: str, spec: Any) -> Any:
        engine = PacedEngine(real_load(model, spec))
        engine.delay_s = state.step_delay_s
        state.loaded.append(engine)
        return engine

    monkeypatch.setattr(inprocess, "load_engine", recording_load)
    return state


@pytest.fixture
def engines(monkeypatch) -> Engines:
    """Record (and let a test pace) every engine an in-process client loads from now on."""
    return _record_engines(monkeypatch)


@pytest.fixture(scope="module")
def module_inference(pytestconfig) -> Iterator[Engines]:
    """One in-process client (one engine load) for all the tests of a module."""
    from django.test import override_settings

    from inference.client import reset_inference_client
    from tests.webplatform.live_server import tiny_model_path

    spec = {"path": str(tiny_model_path(pytestconfig)), "dtype": "float32", "device": "cpu"}
    with (
        pytest.MonkeyPatch.context() as monkeypatch,
        override_settings(INFERENCE_TRANSPORT="inprocess", INFERENCE_MODELS={MODEL: spec}),
    ):
        state = _record_engines(monkeypatch)
        reset_inference_client()
        yield state
        reset_inference_client()


@pytest.fixture
def chat_inference(module_inference: Engines, settings) -> Iterator[Engines]:
    """The module's in-process ``glm-4.6v-flash``, idle at the start and end of the test."""
    # Tenant ids repeat between runs (a fresh test database each time): a fresh answer-cache
    # namespace keeps an earlier run's answers from being served as cache hits.
    settings.ANSWER_CACHE_KEY_PREFIX = f"test-answer-{uuid.uuid4().hex[:12]}"
    yield module_inference
    module_inference.pace(0)
    deadline = time.monotonic() + 5
    while module_inference.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert module_inference.running == 0, "a request of this test is still running"


@pytest.fixture
def paced(engines: Engines) -> Iterator[Engines]:
    """Engine steps take at least 40 ms: a 100-token answer lasts seconds, not a blink."""
    engines.pace(0.04)
    yield engines
    engines.pace(0)


@pytest.fixture
def owner_key(owner, transactional_db) -> str:
    return api_key_for(owner.tenant, name="owner key").raw_key


@pytest.fixture
def outsider_key(outsider, transactional_db) -> str:
    return api_key_for(outsider.tenant, name="outsider key").raw_key


@pytest.fixture
def session_cookie(transactional_db, settings) -> Callable[[Any], str]:
    """``session_cookie(user)``: the ``Cookie`` header value of a logged-in dashboard session."""
    from django.contrib.auth import get_user_model
    from django.test import Client

    def make(user: Any) -> str:
        client = Client()
        # Log in the row as stored: the session keeps a hash of the stored password, and
        # ``UserFactory`` leaves its in-memory (unusable) password unsaved.
        client.force_login(get_user_model().objects.get(pk=user.pk))
        return (
            f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"
        )

    return make


@dataclass
class ChatConnection:
    """A ``WebsocketCommunicator`` on ``webplatform.asgi.application`` with frame helpers."""

    communicator: WebsocketCommunicator

    async def receive(self, timeout_s: float = FRAME_TIMEOUT_S) -> dict[str, Any]:
        output = await self.communicator.receive_output(timeout_s)
        assert output["type"] == "websocket.send", output
        return json.loads(output["text"])

    async def closed_with(self, timeout_s: float = 5.0) -> int:
        output = await self.communicator.receive_output(timeout_s)
        assert output["type"] == "websocket.close", output
        return output.get("code", 1000)

    async def send(self, frame: dict[str, Any]) -> None:
        await self.communicator.send_json_to(frame)

    async def ask(self, content: Any, **options: Any) -> list[dict[str, Any]]:
        # Greedy unless a test says otherwise: sampled tokens of the tiny random model can
        # decode to no text at all, which made assert_streamed_answer flaky.
        await self.send({"type": "message", "content": content, "temperature": 0, **options})
        return await frames_until_end(self.receive)

    async def close(self) -> None:
        await self.communicator.disconnect(timeout=15)


ConnectChat = Callable[..., Awaitable[ChatConnection]]


@pytest.fixture
async def connect_chat() -> AsyncIterator[ConnectChat]:
    """``await connect_chat(query="", key=None, cookie=None, origin=None)``: an accepted
    connection (the handshake is accepted before authentication, which answers in-band)."""
    from webplatform.asgi import application

    opened: list[ChatConnection] = []

    async def connect(
        query: str = "",
        *,
        key: str | None = None,
        cookie: str | None = None,
        origin: str | None = None,
        expect_accept: bool = True,
    ) -> ChatConnection:
        headers = [(b"host", b"testserver")]
        if key is not None:
            headers.append((b"authorization", f"Bearer {key}".encode()))
        if cookie is not None:
            headers.append((b"cookie", cookie.encode()))
        if origin is not None:
            headers.append((b"origin", origin.encode()))
        path = "/ws/chat/" + (f"?{query}" if query else "")
        chat = ChatConnection(WebsocketCommunicator(application, path, headers=headers))
        opened.append(chat)
        accepted, detail = await chat.communicator.connect(timeout=FRAME_TIMEOUT_S)
        assert accepted == expect_accept, detail
        if not accepted:  # a server answers the refused handshake with a disconnect
            await chat.close()
        return chat

    yield connect
    for chat in opened:
        await chat.close()
    # The consumer's database thread keeps its connection open; close it so the test
    # database can be flushed and dropped.
    await sync_to_async(connections.close_all)()
