"""The completion path's counters (webplatform/metrics.py), moved by real requests to the live
server (REST and websocket): admissions refused, images refused (validation and ClamAV),
answer-cache lookups, fallbacks and completion errors; each by its bounded labels, and a
model name a client made up never becomes a label value.

The registry is the process's (the live server runs in a thread of this process), so every
assertion is on the change a test's own requests made.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from tests.factories import PlanFactory, TenantFactory, api_key_for
from tests.webplatform.chat.support import FRAME_TIMEOUT_S, image_message, png_data_uri
from tests.webplatform.uploads import corpus

pytest_plugins = ["tests.webplatform.live_server"]
pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "glm-4.6v-flash"
FALLBACK = "ocr-lite"


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Counts:
    """The sample values of ``wanted`` now; ``changes()`` gives how much each moved since."""

    def __init__(self, *wanted: tuple[str, dict[str, str]]) -> None:
        self.wanted = wanted
        self.before = [value(name, **labels) for name, labels in wanted]

    def changes(self) -> list[float]:
        return [
            value(n, **labels) - b for (n, labels), b in zip(self.wanted, self.before, strict=True)
        ]


def refused(code: str) -> tuple[str, dict[str, str]]:
    return "platform_admissions_refused_total", {"code": code}


def upload(code: str) -> tuple[str, dict[str, str]]:
    return "platform_uploads_refused_total", {"code": code}


def error(model: str, code: str) -> tuple[str, dict[str, str]]:
    return "platform_completion_errors_total", {"model": model, "code": code}


def lookup(result: str) -> tuple[str, dict[str, str]]:
    return "platform_answer_cache_lookups_total", {"result": result}


def _body(content: Any = "Hi", **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 2,
        "temperature": 0.7,
        **extra,
    }


@pytest.fixture
def clamd(settings) -> None:
    url = os.environ.get("CLAMD_URL", "")
    if not url:
        pytest.fail("These tests need clamd: export CLAMD_URL=$(bash scripts/clamd-test.sh)")
    settings.CLAMD_URL = url
    settings.CLAMD_REQUIRED = True


def _client(server: Any, **plan: Any) -> tuple[httpx.Client, str]:
    key = api_key_for(TenantFactory(plan=PlanFactory(**plan))).raw_key
    http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    return http, key


@pytest.fixture
def http(live_asgi_server) -> Iterator[httpx.Client]:
    client, _key = _client(live_asgi_server, requests_per_minute=2)
    with client:
        yield client


def _model_labels(server: Any) -> set[str]:
    exposition = httpx.get(server.url + "/metrics", timeout=10).text
    return {
        sample.labels["model"]
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if "model" in sample.labels
    }


def test_admission_refusals_are_counted_by_code_and_never_by_the_model_asked_for(
    live_asgi_server, http
):
    made_up = "my-own-model-7f3a9c"
    # The registry is the process's: models that earlier tests served keep their series.
    labelled_before = _model_labels(live_asgi_server)
    counts = Counts(
        refused("model_not_found"), refused("max_tokens_too_large"), refused("rate_limit_exceeded")
    )

    assert http.post("/v1/chat/completions", json=_body(model=made_up)).status_code == 404
    too_long = http.post("/v1/chat/completions", json=_body(max_tokens=100_000))
    assert too_long.json()["error"]["code"] == "max_tokens_too_large"
    # Two requests a minute: the third admitted one is refused by the rate limit.
    assert http.post("/v1/chat/completions", json=_body()).status_code == 200
    assert http.post("/v1/chat/completions", json=_body()).status_code == 200
    limited = http.post("/v1/chat/completions", json=_body())
    assert limited.status_code == 429, limited.text
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"

    assert counts.changes() == [1, 1, 1]
    exposition = httpx.get(live_asgi_server.url + "/metrics", timeout=10).text
    assert made_up not in exposition
    # Only served models became label values, whatever clients asked for.
    assert _model_labels(live_asgi_server) - labelled_before <= {MODEL, FALLBACK}


def test_refused_images_are_counted_over_rest_and_the_websocket_and_settle_as_errors(
    live_asgi_server, clamd, caplog
):
    caplog.set_level(logging.INFO, logger="webplatform.requests")
    counts = Counts(
        upload("unsupported_image_type"),
        upload("malware_detected"),
        upload("invalid_image_data"),
        error(MODEL, "unsupported_image_type"),
        error(MODEL, "malware_detected"),
        error(MODEL, "invalid_image_data"),
    )
    http, key = _client(live_asgi_server)
    with http:
        for data, code in (
            (b"plain text, no image", "unsupported_image_type"),
            (corpus.png_carrying_eicar(), "malware_detected"),
        ):
            content = [{"type": "image_url", "image_url": {"url": corpus.data_uri(data)}}]
            response = http.post("/v1/chat/completions", json=_body(content))
            assert response.status_code == 400, response.text
            assert response.json()["error"]["code"] == code

    async def over_the_websocket() -> dict[str, Any]:
        async with connect(
            f"{live_asgi_server.ws_url}/ws/chat/",
            additional_headers={"Authorization": f"Bearer {key}"},
            proxy=None,
            open_timeout=FRAME_TIMEOUT_S,
        ) as ws:
            ready = json.loads(await asyncio.wait_for(ws.recv(), FRAME_TIMEOUT_S))
            assert ready["type"] == "ready"
            bad = "data:image/png;base64,%%%not-base64%%%"
            await ws.send(json.dumps({"type": "message", "content": image_message("?", bad)}))
            return json.loads(await asyncio.wait_for(ws.recv(), FRAME_TIMEOUT_S))

    frame = asyncio.run(over_the_websocket())
    assert (frame["type"], frame["code"]) == ("error", "invalid_image_data")
    assert counts.changes() == [1, 1, 1, 1, 1, 1]
    # Each settled as an error, with its one log line (the websocket's too).
    settled = [r for r in caplog.records if r.getMessage() == "completion settled"]
    assert [(r.channel, r.status, r.error_code) for r in settled] == [  # type: ignore[attr-defined]
        ("rest", "error", "unsupported_image_type"),
        ("rest", "error", "malware_detected"),
        ("websocket", "error", "invalid_image_data"),
    ]


def test_answer_cache_lookups_are_counted_as_misses_then_hits(live_asgi_server, http):
    counts = Counts(lookup("miss"), lookup("hit"))
    greedy = _body([{"type": "text", "text": "Which colour?"}], temperature=0)
    greedy["messages"][0]["content"].append(
        {"type": "image_url", "image_url": {"url": png_data_uri()}}
    )
    first = http.post("/v1/chat/completions", json=greedy)
    assert (first.status_code, first.headers["x-cache"]) == (200, "miss")
    assert counts.changes() == [1, 0]
    second = http.post("/v1/chat/completions", json=greedy)
    assert (second.status_code, second.headers["x-cache"]) == (200, "hit")
    assert counts.changes() == [1, 1]


def _fake_health(monkeypatch, server: Any, per_model: dict[str, dict[str, int]]) -> None:  # type: ignore[no-untyped-def]
    client = server.inference_client()
    real = client.model_health

    async def model_health(model: str):  # type: ignore[no-untyped-def]
        health = await real(model)
        changes = per_model.get(model)
        return msgspec.structs.replace(health, **changes) if changes else health

    monkeypatch.setattr(client, "model_health", model_health)


def test_fallbacks_and_routing_refusals_are_counted(live_asgi_server, monkeypatch):
    counts = Counts(
        ("platform_model_fallbacks_total", {"model": MODEL, "fallback": FALLBACK}),
        error(MODEL, "model_unavailable"),
    )
    _fake_health(monkeypatch, live_asgi_server, {MODEL: {"live_workers": 0}})
    with_fallback, _ = _client(live_asgi_server, fallback_model=FALLBACK)
    without, _ = _client(live_asgi_server)
    with with_fallback, without:
        answered = with_fallback.post("/v1/chat/completions", json=_body(max_tokens=8))
        assert answered.status_code == 200, answered.text
        assert answered.json()["model"] == FALLBACK
        assert counts.changes() == [1, 0]

        refusal = without.post("/v1/chat/completions", json=_body())
        assert refusal.status_code == 503
        assert refusal.json()["error"]["code"] == "model_unavailable"
    assert counts.changes() == [1, 1]
