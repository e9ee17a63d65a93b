"""``webplatform.after_response``: work deferred by a request runs after its last byte, and
a served answer's usage record is written there while its quota lease is not."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import httpx
import pytest

from tenants.models import UsageRecord
from tests.factories import PlanFactory, TenantFactory, api_key_for
from tests.webplatform.live_server import usage_records
from webplatform.after_response import (
    SCOPE_KEY,
    AfterResponse,
    after_response_deferral,
    after_response_pending,
)

pytest_plugins = ["tests.webplatform.live_server"]


class _Request:
    def __init__(self, scope: dict[str, Any]) -> None:
        self.scope = scope


def _run(app: Any) -> list[str]:
    """Call ``app`` wrapped in ``AfterResponse`` for one HTTP request; what happened, in
    order (``sent`` when the response's last body message went out)."""
    events: list[str] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            events.append("sent")

    asyncio.run(AfterResponse(app)({"type": "http", "path": "/x"}, receive, send))
    return events


def test_deferred_work_runs_in_order_after_the_last_byte_and_a_failure_stops_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events: list[str] = []
    late: list[bool] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        defer = after_response_deferral(_Request(scope))
        assert defer is not None

        async def first() -> None:
            events.append("first")
            raise RuntimeError("boom")

        async def second() -> None:
            events.append("second")

        assert defer(first) and defer(second)
        assert after_response_pending() >= 2
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        events.append("returned")
        scope["defer"] = defer

    scope_holder: list[Any] = []

    async def recording(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope_holder.append(scope)
        await app(scope, receive, send)

    with caplog.at_level(logging.ERROR, logger="webplatform.after_response"):
        sent = _run(recording)
    assert sent == ["sent"]
    assert events == ["returned", "first", "second"]
    assert "after-response work of /x failed" in caplog.text
    assert after_response_pending() == 0

    async def too_late() -> None:
        late.append(True)

    # Once the request's work ran, nothing more is taken: the caller must do it itself.
    assert scope_holder[0]["defer"](too_late) is False
    assert late == []


def test_work_deferred_by_an_application_that_failed_still_runs() -> None:
    ran: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def owed() -> None:
            ran.append("owed")

        after_response_deferral(_Request(scope))(owed)  # type: ignore[misc]
        raise RuntimeError("the view crashed")

    with pytest.raises(RuntimeError):
        _run(app)
    assert ran == ["owed"]


def test_without_the_wrapper_there_is_no_deferral() -> None:
    assert after_response_deferral(_Request({"type": "http"})) is None
    assert after_response_deferral(object()) is None
    assert SCOPE_KEY == "webplatform.after_response"


def test_a_served_answer_is_sent_before_its_usage_record_and_after_its_lease(
    live_asgi_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    import webplatform.completions.records as records

    tenant = TenantFactory(plan=PlanFactory(concurrent_requests=1))
    key = api_key_for(tenant).raw_key
    release = threading.Event()
    writing = threading.Event()
    real = records.usage_records_create

    def held(batch: Any) -> Any:
        writing.set()
        assert release.wait(10), "the test never released the usage record"
        return real(batch)

    monkeypatch.setattr(records, "usage_records_create", held)
    headers = {"Authorization": f"Bearer {key}"}
    body = {
        "model": "glm-4.6v-flash",
        "messages": [{"role": "user", "content": "When does this product expire?"}],
        "max_tokens": 2,
        "temperature": 0,
        "cache": False,
    }
    with httpx.Client(base_url=live_asgi_server.url, headers=headers, timeout=60) as http:
        try:
            response = http.post("/v1/chat/completions", json=body)
            # The whole answer arrived while its usage record is still being written...
            assert response.status_code == 200, response.text
            assert writing.wait(10)
            request_id = response.headers["x-request-id"]
            assert not UsageRecord.objects.filter(request_id=request_id).exists()
            assert after_response_pending() >= 1
            # ...and its concurrency lease was already given back: the client's next request
            # (its plan allows one at a time) is admitted, not refused.
            limits = http.get("/v1/usage").json()["rate_limits"]
            assert limits["concurrent_requests"]["in_flight"] == 0
        finally:
            release.set()
    record = usage_records().get(request_id=request_id)
    assert (record.status, record.completion_tokens) == (
        "ok",
        response.json()["usage"]["completion_tokens"],
    )
