"""An ``openai-upstream`` model against real upstreams over HTTP: a second instance of this
platform (plain, streamed and cancelled requests), and a misbehaving server (down, slow past
the timeout, HTTP 500, a malformed SSE stream, a stream cut after its first tokens). Each
ends with a clear OpenAI-format answer or error, or the plan's fallback; the quota lease is
released and a usage record is written."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from inference.client import reset_inference_client
from tenants.models import UsageRecord
from tests.factories import PlanFactory, TenantFactory, api_key_for
from tests.webplatform.api.routing_support import (
    FAST,
    LARGE,
    free_port,
    upstream_spec,
)
from tests.webplatform.live_server import usage_records

pytest_plugins = ["tests.webplatform.live_server", "tests.webplatform.api.routing_support"]

TOKENS_PER_DAY = 200_000


def _configure(settings: Any, live: Any, **models: dict[str, Any]) -> None:
    settings.INFERENCE_MODELS = {**live.models, **models}
    settings.ROUTING = {}
    reset_inference_client()


def _http(server: Any, **plan: Any) -> httpx.Client:
    plan.setdefault("tokens_per_day", TOKENS_PER_DAY)
    key = api_key_for(TenantFactory(plan=PlanFactory(**plan))).raw_key
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _body(model: str = LARGE, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Describe a sunset."}],
        "max_tokens": 8,
        "temperature": 0,
        "cache": False,
        **extra,
    }


def _nothing_held(http: httpx.Client) -> None:
    limits = http.get("/v1/usage").json()["rate_limits"]
    assert limits["concurrent_requests"]["in_flight"] == 0


def _record(response: httpx.Response) -> UsageRecord:
    return usage_records().get(request_id=response.headers["x-request-id"])


def _sse(response: httpx.Response) -> list[Any]:
    return [
        line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")
    ]


def test_plain_and_streamed_requests_go_through_the_second_platform(
    live_asgi_server, upstream_platform, settings
):
    _configure(
        settings,
        live_asgi_server,
        **{
            LARGE: upstream_spec(
                upstream_platform.url + "/v1", api_key_file=upstream_platform.key_file
            )
        },
    )
    key = upstream_platform.key_file
    with _http(live_asgi_server) as http:
        response = http.post("/v1/chat/completions", json=_body())
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == LARGE
        assert body["usage"]["prompt_tokens"] > 0
        assert body["usage"]["completion_tokens"] > 0
        record = _record(response)
        assert (record.model, record.status) == (LARGE, "ok")
        assert record.prompt_tokens == body["usage"]["prompt_tokens"]
        # The second instance served it, for its own operator's tenant, with its own model.
        served = usage_records().filter(tenant=upstream_platform.tenant)
        assert [(r.model, r.status) for r in served] == [(FAST, "ok")]
        assert served[0].completion_tokens == body["usage"]["completion_tokens"]

        with http.stream(
            "POST",
            "/v1/chat/completions",
            json=_body(stream=True, stream_options={"include_usage": True}),
        ) as streamed:
            assert streamed.status_code == 200
            assert streamed.headers["content-type"].startswith("text/event-stream")
            data = _sse(streamed)
        assert data[-1] == "[DONE]"
        chunks = [json.loads(d) for d in data[:-1]]
        assert {c["model"] for c in chunks} == {LARGE}
        text = "".join(
            c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
        )
        assert text
        assert chunks[-1]["usage"]["completion_tokens"] > 0
        assert usage_records().filter(tenant=upstream_platform.tenant).count() == 2
        _nothing_held(http)
    secret = open(key).read().strip()
    assert secret not in response.text


def test_a_client_that_goes_away_closes_the_upstream_stream(
    live_asgi_server, upstream_platform, settings
):
    _configure(
        settings,
        live_asgi_server,
        **{
            LARGE: upstream_spec(
                upstream_platform.url + "/v1", api_key_file=upstream_platform.key_file
            )
        },
    )
    # The tiny model ends a greedy answer with its end token after a few dozen tokens at
    # most (of the prompts tried, this word salad runs longest: 33 tokens), so on a loaded
    # machine the upstream may finish before it hears that we went away: then its record
    # says ok. When it heard in time, it stopped early and says cancelled. That the hang-up
    # reaches the upstream every time is proven against an upstream that drips its answer
    # for 10 s (the next test).
    body = _body(
        stream=True,
        max_tokens=2000,
        messages=[{"role": "user", "content": "lighthouse Tell history journey Write poem"}],
    )
    with _http(live_asgi_server) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as streamed:
            assert streamed.status_code == 200
            request_id = streamed.headers["x-request-id"]
            for line in streamed.iter_lines():
                if line.startswith("data: ") and '"content"' in line:
                    break  # one token read: hang up
        deadline = time.monotonic() + 20
        while True:
            ours = usage_records().filter(request_id=request_id).first()
            theirs = usage_records().filter(tenant=upstream_platform.tenant).first()
            if ours is not None and theirs is not None:
                break
            assert time.monotonic() < deadline, "no usage records after the hang-up"
            time.sleep(0.1)
        assert (ours.model, ours.status) == (LARGE, "cancelled")
        assert theirs.status in ("cancelled", "ok"), theirs.status
        assert 0 < theirs.completion_tokens < 2000
        _nothing_held(http)


@pytest.mark.parametrize(
    ("mode", "extra", "code"),
    [
        ("down", {}, "internal_error"),
        ("500", {}, "internal_error"),
        ("slow", {"timeout_s": 1.0}, "timeout"),
        ("malformed", {}, "internal_error"),
    ],
)
def test_a_failing_upstream_gives_a_clear_error_and_releases_the_lease(
    live_asgi_server, fault_server, settings, mode, extra, code, caplog
):
    app, url = fault_server
    base = f"http://127.0.0.1:{free_port()}/v1" if mode == "down" else f"{url}/{mode}/v1"
    _configure(
        settings,
        live_asgi_server,
        **{LARGE: upstream_spec(base, api_key="sk-upstream-secret", **extra)},
    )
    with _http(live_asgi_server) as http:
        started = time.monotonic()
        response = http.post("/v1/chat/completions", json=_body())
        elapsed = time.monotonic() - started
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["code"], error["type"]) == (code, "server_error")
        assert response.headers["retry-after"]
        # Nothing of the upstream's reaches the client: not its text, address or key.
        assert "secret" not in response.text
        assert "127.0.0.1" not in error["message"]
        record = _record(response)
        assert (record.model, record.status, record.error_code) == (LARGE, "error", code)
        assert (record.prompt_tokens, record.completion_tokens) == (0, 0)
        _nothing_held(http)
    if mode in ("500", "malformed"):
        assert app.hits[mode] == 2  # retried once before the first token
    if mode == "slow":
        assert app.hits[mode] == 1 and elapsed < 5  # not retried past the deadline
    # The failure is logged (with its reason), the key is not.
    assert "upstream glm-4.6v-large failed" in caplog.text
    assert "sk-upstream-secret" not in caplog.text
    sent = app.bodies[-1] if app.bodies else {}
    if sent:
        assert sent["model"] == FAST and sent["stream"] is True


def test_a_stream_cut_after_its_first_tokens_ends_in_band_and_is_not_retried(
    live_asgi_server, fault_server, settings
):
    app, url = fault_server
    _configure(settings, live_asgi_server, **{LARGE: upstream_spec(f"{url}/cut/v1")})
    with _http(live_asgi_server) as http:
        with http.stream("POST", "/v1/chat/completions", json=_body(stream=True)) as streamed:
            assert streamed.status_code == 200
            data = _sse(streamed)
        events = [json.loads(d) for d in data if d != "[DONE]"]
        text = "".join(
            e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices")
        )
        assert text == "Hello there"
        assert events[-1]["error"]["code"] == "worker_lost"
        record = usage_records().get(request_id=streamed.headers["x-request-id"])
        assert (record.status, record.error_code) == ("error", "worker_lost")
        _nothing_held(http)
    assert app.hits["cut"] == 1


def test_the_circuit_opens_then_refuses_at_once_or_falls_back(
    live_asgi_server, fault_server, settings
):
    app, url = fault_server
    spec = upstream_spec(f"{url}/500/v1", breaker_failures=2, breaker_reset_s=60, max_retries=0)
    _configure(settings, live_asgi_server, **{LARGE: spec})
    with _http(live_asgi_server) as http:
        for _ in range(2):
            failed = http.post("/v1/chat/completions", json=_body())
            assert failed.json()["error"]["code"] == "internal_error"
        assert app.hits["500"] == 2
        refused = http.post("/v1/chat/completions", json=_body())
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "model_unavailable"
        assert refused.headers["retry-after"] == str(settings.MODEL_UNAVAILABLE_RETRY_AFTER)
        assert app.hits["500"] == 2  # the open circuit sent nothing upstream
        assert _record(refused).status == "error"
        _nothing_held(http)
    with _http(live_asgi_server, fallback_model=FAST) as http:
        answered = http.post("/v1/chat/completions", json=_body())
        assert answered.status_code == 200, answered.text
        assert answered.json()["model"] == FAST
        assert answered.headers["x-model-fallback"] == f"{LARGE} -> {FAST}"
        assert _record(answered).model == FAST
        _nothing_held(http)


def test_a_hang_up_reaches_an_upstream_that_is_still_answering(
    live_asgi_server, fault_server, settings
):
    """A REST client that goes away mid-stream: the platform closes the upstream stream,
    so the upstream stops answering (it drips a token every 50 ms for 10 s)."""
    app, url = fault_server
    _configure(settings, live_asgi_server, **{LARGE: upstream_spec(f"{url}/drip/v1")})
    with _http(live_asgi_server) as http:
        body = _body(stream=True, max_tokens=1000)
        started = time.monotonic()
        with http.stream("POST", "/v1/chat/completions", json=body) as streamed:
            assert streamed.status_code == 200
            request_id = streamed.headers["x-request-id"]
            for line in streamed.iter_lines():
                if line.startswith("data: ") and '"content"' in line:
                    break  # one token read: hang up
        deadline = time.monotonic() + 5
        while app.disconnected["drip"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert app.disconnected["drip"] == 1  # the upstream saw its client go
        assert time.monotonic() - started < 5  # long before its 10 s answer ended
        deadline = time.monotonic() + 10
        while (ours := usage_records().filter(request_id=request_id).first()) is None:
            assert time.monotonic() < deadline, "no usage record after the hang-up"
            time.sleep(0.1)
        assert (ours.model, ours.status) == (LARGE, "cancelled")
        _nothing_held(http)


def test_cancel_stops_the_upstream_stream_at_its_next_chunk(fault_server):
    """The websocket's stop button: ``cancel(request_id)`` while the answer streams."""
    import asyncio

    from inference.client.upstream import UpstreamClient, UpstreamSpec
    from inference.protocol import (
        DeltaEvent,
        DoneEvent,
        FinishReason,
        InferenceRequest,
        Message,
        TextPart,
    )
    from inference.settings import InferenceSettings

    app, url = fault_server
    spec = UpstreamSpec.from_spec("big", upstream_spec(f"{url}/drip/v1"))
    client = UpstreamClient(settings=InferenceSettings(), spec=spec)
    request = InferenceRequest("req-drip", "1", "big", [Message("user", [TextPart("hi")])])

    async def run() -> list[object]:
        events: list[object] = []
        async for event in client.submit(request):
            events.append(event)
            if sum(isinstance(e, DeltaEvent) for e in events) == 2:
                await client.cancel("req-drip")
        await client.aclose()
        return events

    started = time.monotonic()
    events = asyncio.run(run())
    assert time.monotonic() - started < 5  # not the 10 s of the whole answer
    deltas = [e for e in events if isinstance(e, DeltaEvent)]
    assert [d.text for d in deltas] == [" w0", " w1"]
    assert isinstance(events[-1], DoneEvent)
    assert events[-1].finish_reason is FinishReason.CANCELLED
    assert events[-1].usage.completion_tokens == 2
    deadline = time.monotonic() + 5
    while app.disconnected["drip"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app.disconnected["drip"] == 1  # the upstream saw its client go
