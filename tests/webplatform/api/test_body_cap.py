"""The plan's body cap, enforced while the body streams in (``webplatform/api/body_cap.py``,
``webplatform/asgi_limits.py``; docs/reliability.md, "Hostile input"), over raw sockets and
httpx to a live uvicorn serving the whole application.

``pulled`` counts the body bytes the application took from uvicorn for each request: what
the server read of it, give or take uvicorn's own 64 KiB buffer and the kernel's.
"""

from __future__ import annotations

import json
import select
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis

from tests.factories import TenantFactory, api_key_for
from tests.webplatform.live_server import usage_records
from tests.webplatform.raw_http import read_until_closed
from webplatform.api import body_cap
from webplatform.api.body_cap import chat_body_cap, chat_body_cap_floor

pytest_plugins = ["tests.webplatform.live_server"]

MODEL = "glm-4.6v-flash"
SMALL_IMAGES = 50_000  # bytes per image: a plan cap of about 2.7 MB with the default settings
CHUNK = 64 * 1024
ATTEMPTED = 48 * 1024 * 1024  # what a hostile client tries to send: far past the plan's cap
# What one receive() may bring past the cap: uvicorn hands over what it buffered since the
# last one (one socket read, up to 256 KiB, beyond its 64 KiB high-water mark).
ONE_RECEIVE = 512 * 1024


@dataclass
class Pulled:
    by_request: list[int] = field(default_factory=list)

    @property
    def last(self) -> int:
        return self.by_request[-1]


@pytest.fixture
def pulled(live_asgi_server, monkeypatch) -> Pulled:  # type: ignore[no-untyped-def]
    from webplatform.asgi import application

    inner = application.application_mapping["http"]
    counts = Pulled()

    async def counting(scope: Any, receive: Any, send: Any) -> None:
        index = len(counts.by_request)
        counts.by_request.append(0)

        async def counted_receive() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                counts.by_request[index] += len(message.get("body", b""))
            return message

        await inner(scope, counted_receive, send)

    monkeypatch.setitem(application.application_mapping, "http", counting)
    return counts


@pytest.fixture
def lookups(monkeypatch) -> list[str]:  # type: ignore[no-untyped-def]
    """The keys the ASGI layer looked up before reading a body."""
    seen: list[str] = []
    real = body_cap.api_key_authenticate

    def counted(*, raw_key: str) -> Any:
        seen.append(raw_key)
        return real(raw_key=raw_key)

    monkeypatch.setattr(body_cap, "api_key_authenticate", counted)
    return seen


def _small_plan_key() -> tuple[str, int]:
    tenant = TenantFactory(max_image_bytes_override=SMALL_IMAGES)
    return api_key_for(tenant).raw_key, chat_body_cap(max_image_bytes=SMALL_IMAGES)


def _head(port: int, key: str, framing: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer " + key.encode() + b"\r\n"
        b"Content-Type: application/json\r\n" + framing + b"\r\n\r\n"
    )
    return sock


def _send_chunked_until_answered(sock: socket.socket, total: int) -> int:
    """Send up to ``total`` body bytes, chunked, until the server answers or hangs up;
    returns how many were sent."""
    sent = 0
    chunk = b"%x\r\n" % CHUNK + b" " * CHUNK + b"\r\n"
    while sent < total:
        if select.select([sock], [], [], 0)[0]:
            break  # the answer (or the close) came: stop sending
        try:
            sock.sendall(chunk)
        except OSError:
            break
        sent += CHUNK
    return sent


def _response(data: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, json.loads(body)


def _assert_refused_at_the_plan_cap(data: bytes, *, cap: int) -> None:
    status, headers, body = _response(data)
    assert status == 413, data[:300]
    assert headers["connection"] == "close"
    assert body["error"]["code"] == "request_too_large"
    assert f"at most {cap} bytes" in body["error"]["message"]
    # Recorded as the view records its refusals, under the id the client got.
    record = usage_records().get(request_id=headers["x-request-id"])
    assert (record.status, record.error_code, record.model) == ("error", "request_too_large", "")


def test_a_chunked_body_growing_past_the_plan_cap_is_cut_there(live_asgi_server, pulled):
    key, cap = _small_plan_key()
    sock = _head(live_asgi_server.port, key, b"Transfer-Encoding: chunked")

    sent = _send_chunked_until_answered(sock, ATTEMPTED)
    data, _ = read_until_closed(sock, limit_s=5)

    _assert_refused_at_the_plan_cap(data, cap=cap)
    # The server stopped reading at the plan's cap, not at REQUEST_BODY_MAX_BYTES (128 MiB):
    # the application took at most one receive() past it, and the client was cut off after
    # the socket buffers filled, long before it had sent its 48 MiB.
    assert cap < pulled.last <= cap + ONE_RECEIVE
    assert sent < cap + 16 * 1024 * 1024


def test_a_declared_length_over_the_plan_cap_is_refused_before_reading(live_asgi_server, pulled):
    key, cap = _small_plan_key()
    sock = _head(live_asgi_server.port, key, b"Content-Length: %d" % (cap + 1))

    data, elapsed = read_until_closed(sock, limit_s=5)  # no body byte sent

    _assert_refused_at_the_plan_cap(data, cap=cap)
    assert pulled.last == 0
    assert elapsed < 2  # not the idle deadline: refused from the headers


def _padded_request(size: int) -> bytes:
    """A valid chat request of ``size`` bytes: JSON whitespace carries the bulk."""
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2}
    ).encode()
    return body[:-1] + b" " * (size - len(body)) + b"}"


def test_a_body_under_the_plan_cap_is_answered_and_small_ones_cost_no_lookup(
    live_asgi_server, pulled, lookups
):
    tenant = TenantFactory()  # the default plan: 5 MB images, a cap of about 29 MB
    key = api_key_for(tenant).raw_key
    large = _padded_request(chat_body_cap_floor() + 1024 * 1024)
    small = _padded_request(10_000)

    def chunks(raw: bytes) -> Iterator[bytes]:
        for i in range(0, len(raw), CHUNK):
            yield raw[i : i + CHUNK]

    with httpx.Client(
        base_url=live_asgi_server.url,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        timeout=60,
    ) as http:
        declared = http.post("/v1/chat/completions", content=large)
        chunked = http.post("/v1/chat/completions", content=chunks(large))
        assert lookups == [key, key]
        small_answer = http.post("/v1/chat/completions", content=small)

    for response in (declared, chunked, small_answer):
        assert response.status_code == 200, response.text
        assert response.json()["object"] == "chat.completion"
    assert pulled.by_request[-3:] == [len(large), len(large), len(small)]
    assert "content-length" not in chunked.request.headers
    assert lookups == [key, key]  # a declared length under every plan's cap: none


_NO_VALID_KEY = pytest.mark.parametrize(
    "authorization",
    [b"Bearer sk_nosuchkeyid0_" + b"a" * 40, b"Bearer not-a-key", None],
    ids=["unknown-key", "malformed-key", "no-key"],
)


def _head_as(port: int, authorization: bytes | None, framing: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    auth = b"Authorization: " + authorization + b"\r\n" if authorization else b""
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + auth
        + b"Content-Type: application/json\r\n"
        + framing
        + b"\r\n\r\n"
    )
    return sock


def _assert_the_views_401(data: bytes) -> None:
    status, headers, body = _response(data)
    assert status == 401, data[:300]
    assert body["error"]["code"] == "invalid_api_key"
    assert headers["www-authenticate"] == "Bearer"
    assert headers["x-request-id"].startswith("req_")
    assert headers["connection"] == "close"


@_NO_VALID_KEY
def test_without_a_valid_key_a_chunked_body_is_read_to_the_floor_then_answered_401(
    live_asgi_server, pulled, authorization
):
    """No plan, so the request can only end in the view's 401: its body is not read past
    the smallest cap any plan has (a client without a key cannot make us read 128 MiB)."""
    floor = chat_body_cap_floor()
    sock = _head_as(live_asgi_server.port, authorization, b"Transfer-Encoding: chunked")

    sent = _send_chunked_until_answered(sock, ATTEMPTED)
    data, _ = read_until_closed(sock, limit_s=5)

    _assert_the_views_401(data)
    assert floor < pulled.last <= floor + ONE_RECEIVE
    assert sent < floor + 16 * 1024 * 1024


@_NO_VALID_KEY
def test_without_a_valid_key_a_declared_length_past_the_floor_is_a_401_unread(
    live_asgi_server, pulled, authorization
):
    sock = _head_as(
        live_asgi_server.port, authorization, b"Content-Length: %d" % (chat_body_cap_floor() + 1)
    )

    data, elapsed = read_until_closed(sock, limit_s=5)  # no body byte sent

    _assert_the_views_401(data)
    assert pulled.last == 0
    assert elapsed < 2


def test_without_a_valid_key_a_body_under_the_floor_gets_the_views_own_401(
    live_asgi_server, pulled
):
    raw = _padded_request(64 * 1024)
    response = httpx.post(
        live_asgi_server.url + "/v1/chat/completions",
        content=iter([raw[i : i + CHUNK] for i in range(0, len(raw), CHUNK)]),
        headers={"Authorization": "Bearer not-a-key", "Content-Type": "application/json"},
        timeout=60,
    )

    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert pulled.last == len(raw)  # read whole: the view answered


class _DownCache:
    """The API-key cache while Redis is down: every call fails as redis-py's does."""

    def __getattr__(self, name: str) -> Any:
        def down(*args: Any, **kwargs: Any) -> Any:
            raise redis.ConnectionError("Connection refused")

        return down


def test_a_cache_outage_during_the_lookup_is_the_views_503_not_a_500(
    live_asgi_server, pulled, lookups, monkeypatch
):
    key, cap = _small_plan_key()
    from tenants.services import api_keys

    monkeypatch.setattr(api_keys, "cache", _DownCache())
    raw = _padded_request(cap + 1024 * 1024)

    response = httpx.post(
        live_asgi_server.url + "/v1/chat/completions",
        content=iter([raw[i : i + CHUNK] for i in range(0, len(raw), CHUNK)]),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        timeout=60,
    )

    assert lookups == [key]
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "service_unavailable"
    assert pulled.last == len(raw)  # fell back to the global cap


@pytest.mark.django_db  # database_sync_to_async looks at the connection around the call
async def test_a_database_error_in_the_lookup_leaves_the_global_cap(monkeypatch):
    """PostgreSQL down on a key-cache miss is ours, not the caller's: no cap of its own
    (the view then answers its own error), never an exception out of the ASGI layer."""
    from django.db import OperationalError

    def broken(*, raw_key: str) -> Any:
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(body_cap, "api_key_authenticate", broken)
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(b"authorization", b"Bearer sk_x_y")],
    }
    assert await body_cap.caller_body_cap(scope, None) is None


def test_the_api_is_told_apart_below_a_mount_point():
    from webplatform.asgi_limits import app_path

    assert app_path({"path": "/platform/v1/models", "root_path": "/platform"}) == "/v1/models"
    assert app_path({"path": "/v1/models", "root_path": ""}) == "/v1/models"
    assert app_path({"path": "/v1/models"}) == "/v1/models"
