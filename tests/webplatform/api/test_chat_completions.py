"""``POST /v1/chat/completions`` failure paths and request fields, over real HTTP.

Whatever goes wrong (a model failing before or after it sent text, a refused field, a body
too large) the client gets an OpenAI error (in-band on a stream whose headers are gone) and
the tenant's admission is given back: no lease held, no tokens kept reserved.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.factories import PlanFactory, TenantFactory, api_key_for
from tests.webplatform.live_server import usage_records

pytest_plugins = ["tests.webplatform.live_server"]  # live_asgi_server and friends

MODEL = "glm-4.6v-flash"
TOKENS_PER_DAY = 100_000


class _FailingEngine:
    """The real engine, whose step ``fail_at`` (1-based) raises as a broken GPU would."""

    def __init__(self, engine: Any, fail_at: int) -> None:
        self._engine = engine
        self._fail_at = fail_at
        self.steps = 0

    def step(self) -> Any:
        self.steps += 1
        if self.steps == self._fail_at:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return self._engine.step()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


@pytest.fixture
def engine_failing_at(monkeypatch):  # type: ignore[no-untyped-def]
    """``engine_failing_at(n)``: the in-process engine (built on first request) fails its
    n-th step."""
    from inference.client import inprocess

    real_load_engine = inprocess.load_engine

    def configure(step: int) -> None:
        monkeypatch.setattr(
            inprocess,
            "load_engine",
            lambda model, spec: _FailingEngine(real_load_engine(model, spec), step),
        )

    return configure


@pytest.fixture
def http(live_asgi_server) -> httpx.Client:  # type: ignore[no-untyped-def]
    tenant = TenantFactory(plan=PlanFactory(tokens_per_day=TOKENS_PER_DAY, max_output_tokens=64))
    with live_asgi_server.client_for(tenant) as client:
        yield client


@pytest.fixture
def sdk(live_asgi_server, http) -> OpenAI:  # type: ignore[no-untyped-def]
    key = http.headers["Authorization"].removeprefix("Bearer ")
    return OpenAI(base_url=live_asgi_server.url + "/v1", api_key=key, max_retries=0)


def _body(**extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Describe the image in detail."}],
        "max_tokens": 32,
        "temperature": 0,
        **extra,
    }


def _assert_nothing_held(http: httpx.Client) -> None:
    limits = http.get("/v1/usage").json()["rate_limits"]
    assert limits["concurrent_requests"]["in_flight"] == 0
    assert limits["tokens"]["remaining"] == TOKENS_PER_DAY


def _sse_events(response: httpx.Response) -> list[Any]:
    return [
        "[DONE]" if line == "data: [DONE]" else json.loads(line.removeprefix("data: "))
        for line in response.iter_lines()
        if line.startswith("data: ")
    ]


def test_a_model_failure_after_text_ends_the_stream_with_an_error_event(http, engine_failing_at):
    engine_failing_at(4)  # prefill, two decode steps, then the failure

    with http.stream("POST", "/v1/chat/completions", json=_body(stream=True)) as response:
        assert response.status_code == 200
        events = _sse_events(response)

    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    content = [
        e for e in events[1:-2] if "choices" in e and e["choices"][0]["delta"].get("content")
    ]
    assert content, events
    assert events[-2] == {
        "error": {
            "message": events[-2]["error"]["message"],
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }
    assert events[-1] == "[DONE]"
    assert not any(
        e != "[DONE]" and "choices" in e and e["choices"] and e["choices"][0]["finish_reason"]
        for e in events
    )
    record = usage_records().get(request_id=response.headers["x-request-id"])
    assert (record.status, record.error_code) == ("error", "internal_error")
    _assert_nothing_held(http)


def test_a_model_failure_before_any_text_is_a_json_error(http, engine_failing_at):
    engine_failing_at(1)

    response = http.post("/v1/chat/completions", json=_body())

    assert response.status_code == 503  # nothing was sent yet: worth a retry
    assert response.json()["error"]["code"] == "internal_error"
    assert response.json()["error"]["type"] == "server_error"
    record = usage_records().get(request_id=response.headers["x-request-id"])
    assert record.status == "error"
    _assert_nothing_held(http)


def test_a_streamed_request_whose_model_fails_before_any_text_gets_a_plain_error(
    http, engine_failing_at
):
    # Headers wait for the first event: nothing was streamed, so the client gets the same
    # plain error (and retry advice) as without stream, not a 200 with an in-band error.
    engine_failing_at(1)

    response = http.post("/v1/chat/completions", json=_body(stream=True))

    assert response.status_code == 503
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "internal_error"
    record = usage_records().get(request_id=response.headers["x-request-id"])
    assert (record.status, record.error_code) == ("error", "internal_error")
    _assert_nothing_held(http)


def test_n_above_one_is_refused_clearly(sdk, http):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model=MODEL, messages=_body()["messages"], n=2)

    assert caught.value.code == "unsupported_value"
    assert caught.value.param == "n"
    assert "exactly one choice" in caught.value.message
    _assert_nothing_held(http)


REFUSED_FIELDS = {
    "tools": ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    "json mode": ({"response_format": {"type": "json_object"}}, "response_format"),
    "logprobs": ({"logprobs": True}, "logprobs"),
    "stream_options without stream": (
        {"stream_options": {"include_usage": True}},
        "stream_options",
    ),
    "max_tokens over the plan": ({"max_tokens": 65}, "max_tokens"),
    "temperature out of range": ({"temperature": 3}, "temperature"),
}


def test_fields_we_cannot_honour_are_refused_not_ignored(http, subtests):
    for name, (extra, param) in REFUSED_FIELDS.items():
        with subtests.test(field=name):
            response = http.post("/v1/chat/completions", json=_body(**extra))

            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == param
            _assert_nothing_held(http)


def test_max_completion_tokens_bounds_the_answer(sdk, http):
    response = sdk.chat.completions.create(
        model=MODEL, messages=_body()["messages"], max_completion_tokens=3, temperature=0
    )

    assert response.usage.completion_tokens == 3
    assert response.choices[0].finish_reason == "length"


def test_the_openai_user_field_is_accepted_and_names_no_member(sdk, subtests):
    for user in ("end-user-42", ""):
        with subtests.test(user=user):
            response = sdk.chat.completions.create(
                model=MODEL, messages=_body()["messages"], max_tokens=2, user=user
            )

            record = usage_records().get(request_id=response._request_id)
            assert record.user_id is None  # a tenant's own end user is not one of our users
            assert record.api_key_id is not None


def test_a_body_larger_than_the_plan_allows_is_refused_as_too_large(live_asgi_server):
    tenant = TenantFactory(max_image_bytes_override=50_000)  # body cap: 4 images + 2 MiB
    headers = {"Authorization": f"Bearer {api_key_for(tenant).raw_key}"}
    huge = "x" * (3 * 1024 * 1024)

    response = httpx.post(
        live_asgi_server.url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": huge}]},
        headers=headers,
        timeout=60,
    )

    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert response.headers["x-request-id"]


class _SlowEngine:
    """The real engine, each step delayed: long enough to hang up before the answer."""

    def __init__(self, engine: Any, delay_s: float) -> None:
        self._engine = engine
        self._delay_s = delay_s

    def step(self) -> Any:
        time.sleep(self._delay_s)
        return self._engine.step()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def test_a_client_that_hangs_up_while_its_quota_is_taken_leaves_no_lease(http, monkeypatch):
    # The admission runs in a thread; a client gone meanwhile cancels the task awaiting it
    # but not the thread, which takes the lease all the same. It must be given back, not
    # held until QUOTA_LEASE_SECONDS (10 minutes) against the tenant's concurrency.
    from webplatform.completions import admission

    real_admit = admission._admit
    taken = threading.Event()

    def slow_admit(**kwargs: Any) -> Any:
        time.sleep(0.6)  # the client's 0.2 s timeout passes meanwhile
        try:
            return real_admit(**kwargs)
        finally:
            taken.set()

    monkeypatch.setattr(admission, "_admit", slow_admit)
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json=_body(), timeout=0.2)
    assert taken.wait(5)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        limits = http.get("/v1/usage").json()["rate_limits"]
        if limits["concurrent_requests"]["in_flight"] == 0:
            break
        time.sleep(0.05)
    _assert_nothing_held(http)


def test_a_client_that_hangs_up_on_a_json_request_cancels_it(http, monkeypatch):
    from inference.client import inprocess

    engines: list[_SlowEngine] = []
    real_load_engine = inprocess.load_engine

    def slow(model: str, spec: Any) -> _SlowEngine:
        engines.append(_SlowEngine(real_load_engine(model, spec), delay_s=0.15))
        return engines[-1]

    monkeypatch.setattr(inprocess, "load_engine", slow)
    http.post("/v1/chat/completions", json=_body(max_tokens=1))  # loads the engine
    before = set(usage_records().values_list("request_id", flat=True))
    tokens_left = http.get("/v1/usage").json()["rate_limits"]["tokens"]["remaining"]

    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json=_body(), timeout=0.6)
    hung_up_at = time.monotonic()

    record = None
    while time.monotonic() - hung_up_at < 3.0:
        record = usage_records().exclude(request_id__in=before).first()
        if record is not None and engines[0].stats().running == 0:
            break
        time.sleep(0.05)
    assert record is not None and record.status == "cancelled"
    assert engines[0].stats().running == 0
    assert time.monotonic() - hung_up_at < 1.0  # not after the whole answer (~2.4 s)
    limits = http.get("/v1/usage").json()["rate_limits"]
    assert limits["concurrent_requests"]["in_flight"] == 0
    assert limits["tokens"]["remaining"] == tokens_left  # the reservation came back
