"""Hostile input on ``POST /v1/chat/completions`` (docs/reliability.md, "Hostile input"),
over real HTTP to a live uvicorn server: each is a clear 4xx, none a 500, and what is
refused before admission costs the tenant nothing; what is refused after admission leaves a
usage record.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.factories import PlanFactory, TenantFactory
from tests.webplatform.live_server import usage_records

pytest_plugins = ["tests.webplatform.live_server"]

MODEL = "glm-4.6v-flash"
TOKENS_PER_DAY = 100_000


@pytest.fixture
def http(live_asgi_server) -> Iterator[httpx.Client]:  # type: ignore[no-untyped-def]
    tenant = TenantFactory(plan=PlanFactory(tokens_per_day=TOKENS_PER_DAY, max_output_tokens=64))
    with live_asgi_server.client_for(tenant) as client:
        yield client


def _body(**extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 4,
        "temperature": 0,
        **extra,
    }


def _post_raw(http: httpx.Client, raw: bytes) -> httpx.Response:
    return http.post(
        "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"}
    )


def _assert_not_admitted(http: httpx.Client, response: httpx.Response) -> None:
    """Refused before admission: nothing taken from the quota; the refusal's usage record
    (webplatform/api/rejections.py) names no model and no tokens."""
    record = usage_records().get(request_id=response.headers["x-request-id"])
    assert (record.status, record.model, record.prompt_tokens) == ("error", "", 0)
    assert record.error_code == response.json()["error"]["code"]
    limits = http.get("/v1/usage").json()["rate_limits"]
    assert limits["concurrent_requests"]["in_flight"] == 0
    assert limits["tokens"]["remaining"] == TOKENS_PER_DAY


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return dict(body["error"])


def test_json_nested_10000_deep_is_a_400(http):
    raw = b'{"model": "x", "messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"

    start = time.monotonic()
    response = _post_raw(http, raw)

    assert response.status_code == 400
    assert _error(response)["code"] == "invalid_json"
    assert time.monotonic() - start < 2
    _assert_not_admitted(http, response)


def test_json_nested_beyond_the_depth_limit_is_a_400(http, settings):
    deep: Any = "x"
    for _ in range(settings.REQUEST_JSON_MAX_DEPTH):
        deep = [deep]
    response = http.post("/v1/chat/completions", json=_body(user=None, extra=deep))

    assert response.status_code == 400
    error = _error(response)
    assert error["code"] == "invalid_json"
    assert str(settings.REQUEST_JSON_MAX_DEPTH) in error["message"]


@pytest.mark.parametrize(
    "raw",
    [
        # Escaped lone surrogates, in a string content, a text part and a stop sequence.
        b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}',
        b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
        b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]}',
        # Raw bytes that are not UTF-8 (an encoded surrogate, a stray byte).
        b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
        b'{"messages": [{"role": "user", "content": "\xff"}]}',
        # Not JSON: NaN, a number beyond a double.
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}',
    ],
)
def test_text_that_is_not_unicode_or_json_is_a_400(http, raw):
    response = _post_raw(http, raw)

    assert response.status_code == 400, response.text
    assert _error(response)["type"] == "invalid_request_error"
    _assert_not_admitted(http, response)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", 2**70),
        ("seed", 2**63),
        ("seed", -(2**63) - 1),
        ("max_tokens", 2**40),
        ("max_completion_tokens", 2**70),
        ("n", 2**70),
    ],
)
def test_integers_out_of_range_are_refused_with_their_param(http, field, value):
    response = http.post("/v1/chat/completions", json=_body(**{field: value}))

    assert response.status_code == 400, response.text
    assert _error(response)["param"] == field
    _assert_not_admitted(http, response)


def test_a_64_bit_seed_is_served(http):
    for seed in (2**63 - 1, -(2**63)):
        response = http.post("/v1/chat/completions", json=_body(seed=seed, temperature=1))
        assert response.status_code == 200, response.text


def test_a_chunked_body_is_read(http):
    raw = json.dumps(_body()).encode()

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(raw), 7):
            yield raw[i : i + 7]

    response = http.post(
        "/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"}
    )

    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "chat.completion"


def test_text_beyond_the_character_cap_is_413_before_admission(http, settings):
    settings.CHAT_MAX_TEXT_CHARS = 10_000
    long_text = "word " * 5_000  # 25,000 characters

    for stream in (False, True):
        start = time.monotonic()
        response = http.post(
            "/v1/chat/completions",
            json=_body(messages=[{"role": "user", "content": long_text}], stream=stream),
        )
        assert response.status_code == 413
        assert _error(response)["code"] == "request_too_large"
        assert time.monotonic() - start < 2
        _assert_not_admitted(http, response)


def test_context_length_exceeded_on_a_stream_is_a_plain_400(http, live_asgi_server):
    live_asgi_server.models[MODEL]["max_seq_len"] = 48
    body = _body(messages=[{"role": "user", "content": "tell me a long story " * 20}])

    for stream in (False, True):
        response = http.post("/v1/chat/completions", json={**body, "stream": stream})
        assert response.status_code == 400, response.text
        assert response.headers["content-type"] == "application/json"
        assert _error(response)["code"] == "context_length_exceeded"
        record = usage_records().get(request_id=response.headers["x-request-id"])
        assert (record.status, record.error_code) == ("error", "context_length_exceeded")


def test_a_request_refused_after_admission_leaves_a_usage_record(http):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}
    body = _body(messages=[{"role": "user", "content": [{"type": "text", "text": "?"}, image]}])

    response = http.post("/v1/chat/completions", json=body)

    assert response.status_code == 400, response.text
    code = _error(response)["code"]
    record = usage_records().get(request_id=response.headers["x-request-id"])
    assert (record.status, record.error_code) == ("error", code)
    assert (record.prompt_tokens, record.completion_tokens) == (0, 0)
    limits = http.get("/v1/usage").json()["rate_limits"]
    assert limits["concurrent_requests"]["in_flight"] == 0
    assert limits["tokens"]["remaining"] == TOKENS_PER_DAY  # nothing charged
