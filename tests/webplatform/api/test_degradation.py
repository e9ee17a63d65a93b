"""Degradation over HTTP: refuse at once (503 + retry-after) when a model cannot serve, or
answer with the plan's fallback model (``ocr-lite``, run for real in-process)."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import httpx
import msgspec
from PIL import Image, ImageDraw, ImageFont

from tests.factories import PlanFactory, TenantFactory, api_key_for
from tests.webplatform.live_server import usage_records
from tests.webplatform.uploads import corpus

pytest_plugins = ["tests.webplatform.live_server"]  # live_asgi_server and friends

MODEL = "glm-4.6v-flash"
FALLBACK = "ocr-lite"
TOKENS_PER_DAY = 100_000


def _label_png() -> bytes:
    image = Image.new("RGB", (360, 80), "white")
    ImageDraw.Draw(image).text(
        (10, 15), "EXP 2031-03-14", fill="black", font=ImageFont.load_default(size=40)
    )
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _body(**extra: Any) -> dict[str, Any]:
    content = [
        {"type": "text", "text": "Has this expired?"},
        {"type": "image_url", "image_url": {"url": corpus.data_uri(_label_png())}},
    ]
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 64,
        "temperature": 0,
        **extra,
    }


def _http(server: Any, *, fallback: str = "") -> httpx.Client:
    plan = PlanFactory(tokens_per_day=TOKENS_PER_DAY, fallback_model=fallback)
    key = api_key_for(TenantFactory(plan=plan)).raw_key
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _assert_nothing_held(http: httpx.Client) -> None:
    limits = http.get("/v1/usage").json()["rate_limits"]
    assert limits["concurrent_requests"]["in_flight"] == 0
    assert limits["tokens"]["remaining"] == TOKENS_PER_DAY


def _fake_health(monkeypatch, server: Any, per_model: dict[str, dict[str, int]]) -> None:  # type: ignore[no-untyped-def]
    """Report the fields ``per_model[name]`` over the real health of those models."""
    client = server.inference_client()
    real = client.model_health

    async def model_health(model: str):  # type: ignore[no-untyped-def]
        health = await real(model)
        changes = per_model.get(model)
        return msgspec.structs.replace(health, **changes) if changes else health

    monkeypatch.setattr(client, "model_health", model_health)


def test_a_model_with_no_live_worker_is_refused_at_once(
    live_asgi_server, redis_inference_without_workers
):
    with _http(live_asgi_server) as http:
        started = time.monotonic()
        response = http.post("/v1/chat/completions", json=_body())
        streamed = http.post("/v1/chat/completions", json=_body(stream=True))
        elapsed = time.monotonic() - started

        for answer in (response, streamed):
            assert answer.status_code == 503, answer.text
            assert answer.headers["content-type"].startswith("application/json")
            assert answer.json()["error"]["code"] == "model_unavailable"
            assert answer.json()["error"]["type"] == "server_error"
            assert answer.headers["retry-after"] == "10"
            assert answer.headers["x-request-id"]
        assert elapsed < 3.0  # two refusals, image validation included: nothing waited
        _assert_nothing_held(http)


def test_a_model_whose_queue_is_too_deep_is_refused_as_overloaded(
    live_asgi_server, monkeypatch, settings
):
    bound = 8 * settings.MODEL_MAX_QUEUE_PER_SLOT  # 8 batch slots
    with _http(live_asgi_server) as http:
        _fake_health(
            monkeypatch,
            live_asgi_server,
            {MODEL: {"live_workers": 1, "capacity": 8, "waiting": bound}},
        )
        assert http.post("/v1/chat/completions", json=_body(max_tokens=2)).status_code == 200

        _fake_health(
            monkeypatch,
            live_asgi_server,
            {MODEL: {"live_workers": 1, "capacity": 8, "waiting": bound + 1}},
        )
        response = http.post("/v1/chat/completions", json=_body(cache=False))

        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "model_overloaded"
        assert response.headers["retry-after"] == "2"
        limits = http.get("/v1/usage").json()["rate_limits"]
        assert limits["concurrent_requests"]["in_flight"] == 0


def test_a_plan_with_a_fallback_is_answered_by_the_fallback_model(live_asgi_server, monkeypatch):
    _fake_health(monkeypatch, live_asgi_server, {MODEL: {"live_workers": 0}})
    with _http(live_asgi_server, fallback=FALLBACK) as http:
        response = http.post("/v1/chat/completions", json=_body())

        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == FALLBACK
        assert response.headers["x-model-fallback"] == f"{MODEL} -> {FALLBACK}"
        # ocr-lite really read the label.
        assert "2031-03-14" in body["choices"][0]["message"]["content"]
        record = usage_records().get(request_id=response.headers["x-request-id"])
        assert (record.model, record.status) == (FALLBACK, "ok")

        with http.stream("POST", "/v1/chat/completions", json=_body(stream=True)) as streamed:
            assert streamed.status_code == 200
            assert streamed.headers["x-model-fallback"] == f"{MODEL} -> {FALLBACK}"
            chunks = [
                json.loads(line.removeprefix("data: "))
                for line in streamed.iter_lines()
                if line.startswith("data: {")
            ]
        assert {chunk["model"] for chunk in chunks} == {FALLBACK}
        assert "2031-03-14" in "".join(
            c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]
        )
        # A fallback's answer never stands in for the model's: it was not cached.
        assert streamed.headers["x-cache"] == "miss"


def test_when_the_fallback_cannot_serve_either_the_model_is_refused(live_asgi_server, monkeypatch):
    _fake_health(
        monkeypatch, live_asgi_server, {MODEL: {"live_workers": 0}, FALLBACK: {"live_workers": 0}}
    )
    with _http(live_asgi_server, fallback=FALLBACK) as http:
        response = http.post("/v1/chat/completions", json=_body())

        assert response.status_code == 503
        assert response.json()["error"]["code"] == "model_unavailable"
        assert MODEL in response.json()["error"]["message"]
        _assert_nothing_held(http)
