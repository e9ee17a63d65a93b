"""The websocket chat over a real socket: the ``websockets`` client against uvicorn serving
``webplatform.asgi.application`` (``live_asgi_server``), HTTP calls with ``httpx``.

What only a real server shows: the handshake's HTTP status, close codes on the wire, a
client that goes away for real, a connection left idle, and the same greedy answer over the
websocket as over ``POST /v1/chat/completions``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from channels.db import database_sync_to_async
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.factories import api_key_for
from tests.webplatform.chat.support import (
    FRAME_TIMEOUT_S,
    LONG_PROMPT,
    MODEL,
    answer_text,
    assert_streamed_answer,
    frames_until_end,
    settled_usage_record,
)

pytest_plugins = ["tests.webplatform.live_server"]
pytestmark = pytest.mark.django_db(transaction=True)


def _open(server: Any, query: str = "", **headers: str) -> Any:
    """``async with _open(server, "ticket=...", Authorization=...) as ws`` (no proxy)."""
    origin = headers.pop("Origin", None)
    return connect(
        f"{server.ws_url}/ws/chat/" + (f"?{query}" if query else ""),
        additional_headers=headers,
        origin=origin,
        proxy=None,
        open_timeout=FRAME_TIMEOUT_S,
    )


async def _recv(ws: ClientConnection) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), FRAME_TIMEOUT_S))


async def _ask(ws: ClientConnection, content: Any, **options: Any) -> list[dict[str, Any]]:
    await ws.send(json.dumps({"type": "message", "content": content, **options}))
    return await frames_until_end(lambda: _recv(ws))


async def _refused(ws: ClientConnection) -> tuple[str, int | None]:
    """The error frame's code and the close code the server then sent."""
    frame = await _recv(ws)
    assert frame["type"] == "error", frame
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(ws.recv(), 5)
    return frame["code"], closed.value.rcvd.code if closed.value.rcvd else None


def _http(server: Any, key: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(
        base_url=server.url, headers=headers, trust_env=False, timeout=FRAME_TIMEOUT_S
    )


@pytest.fixture
def key(owner) -> str:
    return api_key_for(owner.tenant, name="live key").raw_key


async def test_a_bearer_key_streams_the_same_greedy_answer_as_the_rest_api(live_asgi_server, key):
    question = "What is in the park?"
    async with _open(live_asgi_server, Authorization=f"Bearer {key}") as ws:
        ready = await _recv(ws)
        assert ready["type"] == "ready" and MODEL in ready["models"]
        frames = await _ask(ws, question, temperature=0, max_tokens=40)

    done = assert_streamed_answer(frames)
    async with _http(live_asgi_server, key) as http:
        response = await http.post(
            "/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": question}],
                "temperature": 0,
                "max_tokens": 40,
                "cache": False,
            },
        )
    assert response.status_code == 200, response.text
    rest = response.json()
    assert answer_text(frames) == rest["choices"][0]["message"]["content"]
    assert done["usage"]["completion_tokens"] == rest["usage"]["completion_tokens"]
    assert done["usage"]["prompt_tokens"] == rest["usage"]["prompt_tokens"]


async def test_a_ticket_from_the_api_opens_one_connection(live_asgi_server, key):
    async with _http(live_asgi_server, key) as http:
        response = await http.post("/v1/chat/tickets")
    assert response.status_code == 201, response.text
    ticket = response.json()["ticket"]
    assert response.json()["url"] == f"/ws/chat/?ticket={ticket}"

    async with _open(live_asgi_server, f"ticket={ticket}") as ws:
        assert (await _recv(ws))["type"] == "ready"
        assert_streamed_answer(await _ask(ws, "Hi!", max_tokens=4))
    async with _open(live_asgi_server, f"ticket={ticket}") as ws:
        assert await _refused(ws) == ("invalid_ticket", 4401)
    async with _open(live_asgi_server) as ws:
        assert await _refused(ws) == ("invalid_api_key", 4401)


async def test_browser_origins_and_the_playground_session(live_asgi_server, owner, outsider, key):
    from django.contrib.auth import get_user_model
    from django.test import Client

    def login() -> str:
        client = Client()
        client.force_login(get_user_model().objects.get(pk=owner.user.pk))
        return f"sessionid={client.cookies['sessionid'].value}"

    cookie = await database_sync_to_async(login)()
    same_site = f"http://127.0.0.1:{live_asgi_server.port}"

    # A page on another site: the handshake itself is refused, whatever it carries.
    for credentials in ({"Cookie": cookie}, {"Authorization": f"Bearer {key}"}):
        with pytest.raises(InvalidStatus) as refused:
            async with _open(
                live_asgi_server,
                f"tenant={owner.tenant.pk}",
                Origin="https://evil.example",
                **credentials,
            ):
                pass
        assert refused.value.response.status_code == 403

    # The dashboard's own page: the session chats for the member's tenant, not another's.
    async with _open(
        live_asgi_server, f"tenant={owner.tenant.pk}", Origin=same_site, Cookie=cookie
    ) as ws:
        assert (await _recv(ws))["type"] == "ready"
        done = assert_streamed_answer(await _ask(ws, "Hello!", max_tokens=4))
    record = await settled_usage_record(done["request_id"])
    assert (record.channel, record.user_id) == ("playground", owner.user.pk)
    async with _open(
        live_asgi_server, f"tenant={outsider.tenant.pk}", Origin=same_site, Cookie=cookie
    ) as ws:
        assert await _refused(ws) == ("insufficient_permissions", 4403)


async def test_a_client_that_goes_away_mid_stream_cancels_its_request(live_asgi_server, key, paced):
    async with _open(live_asgi_server, Authorization=f"Bearer {key}") as ws:
        await _recv(ws)
        await ws.send(
            json.dumps(
                {"type": "message", "content": LONG_PROMPT, "max_tokens": 2000, "temperature": 0}
            )
        )
        start = await _recv(ws)
        assert start["type"] == "start"
        assert (await _recv(ws))["type"] == "delta"
        assert paced.running == 1
    # Leaving the ``async with`` closed the socket in the middle of the answer.

    assert await paced.wait_idle() == 0
    record = await settled_usage_record(start["request_id"])
    assert record is not None and record.status == "cancelled"
    assert record.completion_tokens < 40


@pytest.mark.slow
async def test_an_idle_connection_stays_open(live_asgi_server, key):
    """Longer than the 5 s a Redis channel-layer read may block (and redis-py 8 times out)."""
    async with _open(live_asgi_server, Authorization=f"Bearer {key}") as ws:
        await _recv(ws)
        await asyncio.sleep(5.5)
        assert_streamed_answer(await _ask(ws, "Still there?", max_tokens=4))
