"""What settling a request leaves behind besides usage: the content log (only when the
organisation turned it on) and the Prometheus metrics."""

from __future__ import annotations

import re

import httpx
import pytest

from tenants.models import Tenant
from tests.factories import PlanFactory, TenantFactory, api_key_for
from tests.webplatform.live_server import content_log_entries

pytest_plugins = ["tests.webplatform.live_server"]

MODEL = "glm-4.6v-flash"


def _ask(live_asgi_server, tenant: Tenant, question: str) -> httpx.Response:  # type: ignore[no-untyped-def]
    return httpx.post(
        live_asgi_server.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {api_key_for(tenant).raw_key}"},
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 4,
            "temperature": 0,
            "cache": False,
        },
        timeout=60,
    )


@pytest.mark.parametrize("logging_on", [True, False])
def test_prompt_and_answer_are_kept_only_when_the_organisation_logs_content(
    live_asgi_server, logging_on: bool
) -> None:
    tenant = TenantFactory(plan=PlanFactory(), log_content=logging_on)
    response = _ask(live_asgi_server, tenant, "Is step two of this homework right?")
    assert response.status_code == 200, response.text
    request_id = response.headers["x-request-id"]

    entries = content_log_entries().filter(tenant=tenant, request_id=request_id)
    if logging_on:
        entry = entries.get()
        assert entry.prompt == "Is step two of this homework right?"
        assert entry.answer == response.json()["choices"][0]["message"]["content"]
    else:
        assert not entries.exists()


def _requests_ok(metrics_text: str) -> float:
    pattern = re.compile(
        r'^platform_completion_requests_total\{[^}]*model="glm-4\.6v-flash"[^}]*status="ok"[^}]*\} (\S+)$',
        re.MULTILINE,
    )
    return sum(float(value) for value in pattern.findall(metrics_text))


def test_metrics_count_settled_requests_and_report_workers(live_asgi_server) -> None:
    before = _requests_ok(httpx.get(live_asgi_server.url + "/metrics").text)
    tenant = TenantFactory(plan=PlanFactory())
    assert _ask(live_asgi_server, tenant, "Hello?").status_code == 200

    text = httpx.get(live_asgi_server.url + "/metrics").text
    assert _requests_ok(text) == before + 1
    assert 'platform_model_live_workers{model="glm-4.6v-flash"} 1.0' in text


def test_metrics_require_the_token_when_one_is_set(live_asgi_server, settings) -> None:
    settings.METRICS_TOKEN = "scrape-secret"
    assert httpx.get(live_asgi_server.url + "/metrics").status_code == 401
    authorised = httpx.get(
        live_asgi_server.url + "/metrics", headers={"Authorization": "Bearer scrape-secret"}
    )
    assert authorised.status_code == 200
