"""The official ``openai`` Python package against the live platform (real HTTP, real model).

Every test runs the whole request path: uvicorn, API-key authentication, admission, image
validation, the in-process queue, the tiny GLM-4.6V engine, SSE framing and settlement.
"""

from __future__ import annotations

import base64
import threading
import time
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.factories import PlanFactory, TenantFactory, api_key_for
from tests.webplatform.live_server import usage_records
from tests.webplatform.uploads import corpus

pytest_plugins = ["tests.webplatform.live_server"]  # the live_asgi_server fixture

MODEL = "glm-4.6v-flash"
QUESTION = "What is in this image?"


def _png() -> bytes:
    return corpus.encode(corpus.solid(corpus.RED, (64, 48)), "PNG")


def _jpeg() -> bytes:
    return corpus.encode(corpus.solid(corpus.BLUE, (56, 56)), "JPEG", quality=90)


def _image_message(uri: str, *, detail: str | None = None) -> list[dict[str, Any]]:
    image_url: dict[str, Any] = {"url": uri}
    if detail is not None:
        image_url["detail"] = detail
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": QUESTION},
                {"type": "image_url", "image_url": image_url},
            ],
        }
    ]


@pytest.fixture
def key(owner) -> str:  # type: ignore[no-untyped-def]
    return api_key_for(owner.tenant).raw_key


@pytest.fixture
def sdk(live_asgi_server, key) -> OpenAI:  # type: ignore[no-untyped-def]
    return OpenAI(base_url=live_asgi_server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_a_completion_with_an_image_answers_with_usage_and_image_tokens(sdk):
    response = sdk.chat.completions.create(
        model=MODEL,
        messages=_image_message(corpus.data_uri(_png()), detail="low"),
        max_tokens=12,
        temperature=0,
    )

    assert response.object == "chat.completion"
    assert response.model == MODEL
    assert response.id.startswith("chatcmpl-")
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.completion_tokens <= 12
    assert response.usage.prompt_tokens_details.image_tokens > 0
    assert response.usage.total_tokens == (
        response.usage.prompt_tokens + response.usage.completion_tokens
    )
    assert response._request_id and response.id == f"chatcmpl-{response._request_id}"
    record = usage_records().get(request_id=response._request_id)
    assert (record.status, record.image_count, record.cache_hit) == ("ok", 1, False)
    assert record.image_tokens == response.usage.prompt_tokens_details.image_tokens


def test_a_jpeg_with_each_detail_value_is_accepted(sdk, subtests):
    for detail in ("auto", "high"):
        with subtests.test(detail=detail):
            response = sdk.chat.completions.create(
                model=MODEL,
                messages=_image_message(corpus.data_uri(_jpeg(), "image/jpeg"), detail=detail),
                max_tokens=4,
            )

            assert response.choices[0].message.content is not None
            assert response.usage.prompt_tokens_details.image_tokens > 0


def test_an_unknown_detail_value_is_a_bad_request(sdk):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(
            model=MODEL, messages=_image_message(corpus.data_uri(_png()), detail="ultra")
        )

    assert caught.value.code == "invalid_request"
    assert caught.value.param == "messages[0].content[1].image_url.detail"


def test_a_streamed_completion_matches_the_greedy_answer(sdk):
    messages = _image_message(corpus.data_uri(_png()))
    stream = sdk.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None]
    assert len(finals) == 1
    assert finals[0].choices[0].finish_reason in ("stop", "length")
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.prompt_tokens_details.image_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len({c.id for c in chunks}) == 1

    # The same request again, not from the answer cache: greedy decoding gives the same text.
    whole = sdk.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=12,
        temperature=0,
        extra_body={"cache": False},
    )
    assert whole.choices[0].message.content == streamed
    assert whole.usage.completion_tokens == usage_chunk.usage.completion_tokens
    assert whole.usage.prompt_tokens == usage_chunk.usage.prompt_tokens
    hits = usage_records().filter(cache_hit=True).count()
    assert hits == 0


def test_a_wrong_key_is_an_authentication_error_with_a_request_id(live_asgi_server):
    client = OpenAI(
        base_url=live_asgi_server.url + "/v1", api_key="sk_nope_wrongsecret", max_retries=0
    )

    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])

    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    assert caught.value.request_id


def test_the_second_request_in_a_minute_is_a_rate_limit_error(live_asgi_server):
    tenant = TenantFactory(plan=PlanFactory(requests_per_minute=1))
    client = OpenAI(
        base_url=live_asgi_server.url + "/v1",
        api_key=api_key_for(tenant).raw_key,
        max_retries=0,
    )
    messages = [{"role": "user", "content": "hi"}]
    client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)

    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)

    error = caught.value
    assert error.status_code == 429
    assert error.code == "rate_limit_exceeded"
    assert error.type == "rate_limit_error"
    headers = error.response.headers
    assert headers["x-ratelimit-limit-requests"] == "1"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert int(headers["retry-after"]) >= 1
    assert "x-ratelimit-reset-requests" in headers
    assert error.request_id


def test_a_broken_image_is_a_bad_request_with_its_code(sdk):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(
            model=MODEL, messages=_image_message(corpus.data_uri(corpus.truncated_jpeg()))
        )

    assert caught.value.status_code == 400
    assert caught.value.code == "image_decode_failed"
    assert caught.value.param == "messages[0].content[1].image_url"
    assert caught.value.request_id


def test_a_remote_image_url_is_refused(sdk, subtests):
    for url in ("https://example.com/cat.png", "http://127.0.0.1:6379/secret.png"):
        with subtests.test(url=url):
            with pytest.raises(openai.BadRequestError) as caught:
                sdk.chat.completions.create(model=MODEL, messages=_image_message(url))

            assert caught.value.code == "image_url_not_allowed"


def test_the_simple_form_answers_over_plain_http(live_asgi_server, key):
    body = {
        "image": base64.b64encode(_png()).decode(),
        "prompt": QUESTION,
        "max_tokens": 8,
        "temperature": 0,
    }
    response = httpx.post(
        live_asgi_server.url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )

    assert response.status_code == 200, response.text
    data = response.json()
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"]["content"]
    assert data["usage"]["prompt_tokens_details"]["image_tokens"] > 0
    assert response.headers["x-request-id"] == data["id"].removeprefix("chatcmpl-")


def test_every_response_carries_a_request_id(live_asgi_server, key):
    url = live_asgi_server.url + "/v1/chat/completions"
    auth = {"Authorization": f"Bearer {key}"}
    hello = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with httpx.Client(timeout=60) as http:
        responses = {
            "ok": http.post(url, json=hello, headers=auth),
            "stream": http.post(url, json={**hello, "stream": True}, headers=auth),
            "no key": http.post(url, json=hello),
            "bad key": http.post(url, json=hello, headers={"Authorization": "Bearer sk_x_y"}),
            "bad json": http.post(url, content=b"{", headers={**auth, "content-type": "x"}),
            "invalid": http.post(url, json={"messages": []}, headers=auth),
            "bad image": http.post(
                url, json={"prompt": "?", "image": "!!notbase64!!"}, headers=auth
            ),
            "bad model": http.post(url, json={**hello, "model": "nope"}, headers=auth),
        }
    statuses = {name: r.status_code for name, r in responses.items()}
    assert statuses == {
        "ok": 200,
        "stream": 200,
        "no key": 401,
        "bad key": 401,
        "bad json": 415,
        "invalid": 400,
        "bad image": 400,
        "bad model": 404,
    }
    ids = [r.headers.get("x-request-id") for r in responses.values()]
    assert all(ids), {name: r.headers.get("x-request-id") for name, r in responses.items()}
    assert len(set(ids)) == len(ids)


class _SlowEngine:
    """The real engine, with each step delayed: long enough to disconnect mid-answer."""

    def __init__(self, engine: Any, delay_s: float) -> None:
        self._engine = engine
        self._delay_s = delay_s
        self.steps = 0

    def step(self) -> Any:
        time.sleep(self._delay_s)
        self.steps += 1
        return self._engine.step()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def test_a_client_that_disconnects_mid_stream_cancels_its_request(
    live_asgi_server, key, monkeypatch
):
    from inference.client import inprocess

    engines: list[_SlowEngine] = []
    loaded = threading.Event()
    real_load_engine = inprocess.load_engine

    def slow_engine(model: str, spec: Any) -> _SlowEngine:
        engine = _SlowEngine(real_load_engine(model, spec), delay_s=0.15)
        engines.append(engine)
        loaded.set()
        return engine

    monkeypatch.setattr(inprocess, "load_engine", slow_engine)  # read when the client is built
    body = {
        "messages": [{"role": "user", "content": "Describe the image in detail."}],
        "max_tokens": 200,
        "temperature": 0,
        "stream": True,
    }
    with httpx.Client(timeout=60) as http:
        with http.stream(
            "POST",
            live_asgi_server.url + "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
        ) as response:
            assert response.status_code == 200
            request_id = response.headers["x-request-id"]
            lines = response.iter_lines()
            assert '"role":"assistant"' in next(line for line in lines if line)
            assert '"content"' in next(line for line in lines if '"content":"' in line)
        # Leaving the block closes the connection before the answer is complete.
        closed_at = time.monotonic()

    assert loaded.is_set()
    engine = engines[0]
    steps_at_close = engine.steps
    deadline = closed_at + 3.0
    while time.monotonic() < deadline:
        record = usage_records().filter(request_id=request_id).first()
        if record is not None and engine.stats().running == 0:
            break
        time.sleep(0.05)
    assert engine.stats().running == 0
    assert record is not None and record.status == "cancelled"
    # What was consumed before the hang-up is charged: the prompt and the streamed tokens.
    assert record.prompt_tokens > 0 and record.completion_tokens >= 1
    # Freed within a couple of steps, not after the rest of the answer (~15 tokens).
    assert engine.steps - steps_at_close <= 3
    assert time.monotonic() - closed_at < 1.5
