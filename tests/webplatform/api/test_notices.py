"""A notice from the worker side (``inference.protocol.NoticeEvent``: the request's worker
died and another took it over) reaches a streaming REST client as an SSE comment, at once
and before any text; a whole (non-streamed) answer is unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from inference.protocol import NOTICE_MESSAGES, TAKEN_OVER
from tests.factories import PlanFactory, TenantFactory
from tests.webplatform.notice_client import TakenOverClient
from webplatform.completions import pipeline

pytestmark = pytest.mark.django_db(transaction=True)
pytest_plugins = ["tests.webplatform.live_server"]

MODEL = "glm-4.6v-flash"


@pytest.fixture
def http(live_asgi_server, monkeypatch) -> Iterator[httpx.Client]:  # type: ignore[no-untyped-def]
    taken_over = TakenOverClient(pipeline.get_inference_client())
    monkeypatch.setattr(pipeline, "get_inference_client", lambda: taken_over)
    tenant = TenantFactory(plan=PlanFactory(max_output_tokens=64))
    with live_asgi_server.client_for(tenant) as client:
        yield client


def _body(**extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 8,
        "temperature": 1.0,
        **extra,
    }


def test_a_streamed_answer_shows_the_takeover_as_an_sse_comment_before_its_text(http):
    with http.stream("POST", "/v1/chat/completions", json=_body(stream=True)) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    comment = f": {NOTICE_MESSAGES[TAKEN_OVER]}"
    assert comment in lines
    data = [line for line in lines if line.startswith("data: ")]
    # After the role chunk, before the first piece of text; the answer then runs to its end.
    assert lines.index(comment) == 1 and lines[0] == data[0]
    assert data[-1] == "data: [DONE]"
    assert any('"content":' in line for line in data[1:-1])


def test_a_whole_answer_is_unchanged_by_a_notice(http):
    response = http.post("/v1/chat/completions", json=_body())
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"]
