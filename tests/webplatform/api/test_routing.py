"""``model: "auto"`` over HTTP: each routing rule, and escalation, with the answering model
in the response, the ``x-routed-model``/``x-routed-rule`` headers, the usage record (the
request log's rows) and the quota. The slow model is ``glm-4.6v-large``, an
``openai-upstream`` model served by a second instance of the platform over real HTTP."""

from __future__ import annotations

import io
import re
from typing import Any

import httpx
from django.test import Client
from django.urls import reverse
from PIL import Image

from inference.client import reset_inference_client
from tenants.models import UsageRecord
from tests.factories import PlanFactory, TenantFactory, api_key_for
from tests.webplatform.api.routing_support import FAST, LARGE, upstream_spec
from tests.webplatform.live_server import usage_records
from tests.webplatform.uploads import corpus

pytest_plugins = ["tests.webplatform.live_server", "tests.webplatform.api.routing_support"]

TOKENS_PER_DAY = 500_000
NEVER_ESCALATE = {"enabled": False}


def _configure(
    settings: Any, live: Any, upstream: Any, routing: dict[str, Any], **models: Any
) -> None:
    large = upstream_spec(upstream.url + "/v1", api_key_file=upstream.key_file)
    settings.INFERENCE_MODELS = {**live.models, LARGE: large, **models}
    settings.ROUTING = {"fast_model": FAST, "slow_model": LARGE, **routing}
    reset_inference_client()


def _http(server: Any, **plan: Any) -> httpx.Client:
    plan.setdefault("tokens_per_day", TOKENS_PER_DAY)
    key = api_key_for(TenantFactory(plan=PlanFactory(**plan))).raw_key
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _png(size: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 40, 40)).save(buffer, "PNG")
    return corpus.data_uri(buffer.getvalue())


def _ask(text: str, *, images: int = 0, size: int = 16, **extra: Any) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    content += [{"type": "image_url", "image_url": {"url": _png(size)}} for _ in range(images)]
    return {
        "model": "auto",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 6,
        "temperature": 0,
        "cache": False,
        **extra,
    }


def _check(response: httpx.Response, model: str, rule: str) -> UsageRecord:
    assert response.status_code == 200, response.text
    assert response.json()["model"] == model
    assert response.headers["x-routed-model"] == model
    assert response.headers["x-routed-rule"] == rule
    assert "x-model-fallback" not in response.headers
    record = usage_records().get(request_id=response.headers["x-request-id"])
    assert (record.model, record.route_rule, record.status) == (model, rule, "ok")
    return record


CASES = [
    ("fast by default", _ask("What colour is this?"), FAST, "default"),
    ("quality high", _ask("What colour is this?", quality="high"), LARGE, "quality"),
    (
        "contract review",
        _ask("Please review this contract for liability risks."),
        LARGE,
        "intent:legal_review",
    ),
    (
        "contract review in Chinese",
        _ask("请帮我审查这份合同的违约条款"),
        LARGE,
        "intent:legal_review",
    ),
    (
        "multi-step math",
        _ask("Prove that the equation has no real root, step by step."),
        LARGE,
        "intent:multi_step_math",
    ),
    ("math in Chinese", _ask("请证明这个不等式并写出推导"), LARGE, "intent:multi_step_math"),
    (
        "long document",
        _ask("Summarize the whole document, every page."),
        LARGE,
        "intent:long_document",
    ),
    ("long document in Chinese", _ask("总结这份120页的报告全文"), LARGE, "intent:long_document"),
    ("prompt length", _ask("Tell me about colours. " * 8), LARGE, "prompt_length"),
    ("image pixels", _ask("What colour is this?", images=1, size=48), LARGE, "image_pixels"),
    ("image count", _ask("Which colours?", images=3), LARGE, "image_count"),
    ("one small image stays fast", _ask("What colour is this?", images=1), FAST, "default"),
]


def test_each_rule_routes_auto_and_says_so(live_asgi_server, upstream_platform, settings, subtests):
    routing = {
        "max_fast_prompt_chars": 120,
        "max_fast_image_pixels": 48 * 48 - 1,
        "max_fast_images": 2,
        "escalation": NEVER_ESCALATE,
    }
    _configure(settings, live_asgi_server, upstream_platform, routing)
    with _http(live_asgi_server) as http:
        for name, body, model, rule in CASES:
            with subtests.test(name):
                _check(http.post("/v1/chat/completions", json=body), model, rule)
        # The slow answers really came from the second instance.
        slow = sum(1 for *_, model, _rule in CASES if model == LARGE)
        assert usage_records().filter(tenant=upstream_platform.tenant).count() == slow
        # A streamed request is routed before its first token: the headers say so.
        with http.stream(
            "POST", "/v1/chat/completions", json=_ask("Review this NDA clause.", stream=True)
        ) as streamed:
            assert streamed.status_code == 200
            assert streamed.headers["x-routed-model"] == LARGE
            assert streamed.headers["x-routed-rule"] == "intent:legal_review"
            assert f'"model":"{LARGE}"' in streamed.read().decode().replace(" ", "")
        # Naming a model is not routed.
        named = http.post("/v1/chat/completions", json=_ask("Review this contract.", model=FAST))
        assert named.json()["model"] == FAST and "x-routed-model" not in named.headers
        assert usage_records().get(request_id=named.headers["x-request-id"]).route_rule == ""


def test_the_plan_decides_when_it_allows_one_model(live_asgi_server, upstream_platform, settings):
    _configure(settings, live_asgi_server, upstream_platform, {"escalation": NEVER_ESCALATE})
    with _http(live_asgi_server, allowed_models=[FAST]) as http:
        _check(http.post("/v1/chat/completions", json=_ask("Review this contract.")), FAST, "plan")
    with _http(live_asgi_server, allowed_models=[LARGE]) as http:
        _check(http.post("/v1/chat/completions", json=_ask("Hello")), LARGE, "plan")
    with _http(live_asgi_server, allowed_models=["ocr-lite"]) as http:
        refused = http.post("/v1/chat/completions", json=_ask("Hello"))
        assert refused.status_code == 404
        assert refused.json()["error"]["code"] == "model_not_found"
    # A plan whose default model is auto routes requests that name none.
    with _http(live_asgi_server, default_model="auto") as http:
        body = _ask("请审查这份合同")
        del body["model"]
        _check(http.post("/v1/chat/completions", json=body), LARGE, "intent:legal_review")


def test_an_unsure_fast_answer_is_escalated_and_both_are_charged(
    live_asgi_server, upstream_platform, settings, owner
):
    # Every answer of the tiny (random) model counts as unsure here.
    routing = {"escalation": {"enabled": True, "unsure_patterns": [r"[\s\S]"]}}
    _configure(settings, live_asgi_server, upstream_platform, routing)
    owner.tenant.plan.tokens_per_day = TOKENS_PER_DAY
    owner.tenant.plan.save()
    key = api_key_for(owner.tenant).raw_key
    with httpx.Client(
        base_url=live_asgi_server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60
    ) as http:
        response = http.post("/v1/chat/completions", json=_ask("What colour is this?"))
        record = _check(response, LARGE, "escalate:unsure")
        assert record.escalated_from == FAST
        assert record.escalated_prompt_tokens > 0 and record.escalated_completion_tokens > 0
        usage = response.json()["usage"]
        assert (record.prompt_tokens, record.completion_tokens) == (
            usage["prompt_tokens"],
            usage["completion_tokens"],
        )
        used = TOKENS_PER_DAY - http.get("/v1/usage").json()["rate_limits"]["tokens"]["remaining"]
        fast = record.escalated_prompt_tokens + record.escalated_completion_tokens
        assert used == fast + usage["prompt_tokens"] + usage["completion_tokens"]

        # Streamed: routed before the first token, never escalated.
        with http.stream(
            "POST", "/v1/chat/completions", json=_ask("What colour is this?", stream=True)
        ) as streamed:
            assert streamed.headers["x-routed-model"] == FAST
            assert streamed.headers["x-routed-rule"] == "default"
            streamed.read()
        record = usage_records().get(request_id=streamed.headers["x-request-id"])
        assert (record.model, record.escalated_from) == (FAST, "")
        # With an image: the slow model gets it too (over HTTP, as a data URI).
        with_image = http.post("/v1/chat/completions", json=_ask("What colour?", images=1))
        assert _check(with_image, LARGE, "escalate:unsure").image_count == 1
        _dashboard_shows(owner, usage_records().get(request_id=response.headers["x-request-id"]))


def test_a_low_logprob_fast_answer_is_escalated(
    live_asgi_server, upstream_platform, fault_server, settings
):
    # The fast model is an upstream that reports logprobs (-3 a token): under the threshold.
    app, url = fault_server
    fast = upstream_spec(f"{url}/unsure/v1", logprobs=True)
    routing = {
        "fast_model": "fast-upstream",
        "escalation": {"enabled": True, "min_mean_logprob": -1.5, "unsure_patterns": []},
    }
    _configure(settings, live_asgi_server, upstream_platform, {}, **{"fast-upstream": fast})
    settings.ROUTING = {**settings.ROUTING, **routing}
    with _http(live_asgi_server) as http:
        response = http.post("/v1/chat/completions", json=_ask("What colour is this?"))
        record = _check(response, LARGE, "escalate:logprob")
        assert record.escalated_from == "fast-upstream"
        assert (record.escalated_prompt_tokens, record.escalated_completion_tokens) == (11, 3)
        assert app.bodies[-1]["logprobs"] is True
        # Above the threshold the fast answer stands.
        settings.ROUTING = {**settings.ROUTING, "escalation": {"min_mean_logprob": -5.0}}
        kept = http.post("/v1/chat/completions", json=_ask("What colour is this?"))
        assert kept.json()["choices"][0]["message"]["content"] == "It is blue"
        _check(kept, "fast-upstream", "default")


def test_a_failed_escalation_serves_the_fast_answer(
    live_asgi_server, upstream_platform, fault_server, settings
):
    app, url = fault_server
    routing = {"escalation": {"enabled": True, "unsure_patterns": [r"[\s\S]"]}}
    _configure(settings, live_asgi_server, upstream_platform, routing)
    settings.INFERENCE_MODELS = {**settings.INFERENCE_MODELS, LARGE: upstream_spec(f"{url}/500/v1")}
    reset_inference_client()
    with _http(live_asgi_server) as http:
        response = http.post("/v1/chat/completions", json=_ask("What colour is this?"))
        record = _check(response, FAST, "escalate:failed")
        assert record.escalated_from == ""
        assert app.hits["500"] == 2
        limits = http.get("/v1/usage").json()["rate_limits"]
        assert limits["concurrent_requests"]["in_flight"] == 0
        used = TOKENS_PER_DAY - limits["tokens"]["remaining"]
        assert used == record.prompt_tokens + record.completion_tokens


def _dashboard_shows(owner: Any, escalated: UsageRecord) -> None:
    # The dashboard: the request log names the answering model and the rule, the usage page
    # splits by model (the escalated fast answer's tokens under the fast model), and the
    # playground offers auto.
    browser = Client()
    owner.user.refresh_from_db()
    browser.force_login(owner.user)
    tenant_id = owner.tenant.pk
    log = browser.get(reverse("dashboard:requests", args=[tenant_id])).content.decode()
    row = log[log.index(f'data-request="{escalated.request_id}"') :]
    row = row[: row.index("</tr>")]
    assert LARGE in row and "escalate:unsure" in row and FAST in row
    detail = browser.get(
        reverse("dashboard:request-detail", args=[tenant_id, escalated.request_id])
    ).content.decode()
    assert "escalate:unsure" in detail and FAST in detail
    usage = browser.get(reverse("dashboard:usage", args=[tenant_id])).content.decode()
    large_row = usage[usage.index(f'data-model="{LARGE}"') :]
    large_row = large_row[: large_row.index("</tr>")]
    assert re.findall(r'class="num">([^<]+)<', large_row)[:3] == ["2", "2", "0"]
    fast_row = usage[usage.index(f'data-model="{FAST}"') :]
    fast_row = fast_row[: fast_row.index("</tr>")]
    # The streamed request (answered by the fast model) and the escalated-away fast answers.
    assert re.findall(r'class="num">([^<]+)<', fast_row)[:3] == ["1", "1", "2"]
    playground = browser.get(reverse("dashboard:playground", args=[tenant_id])).content.decode()
    assert '"auto"' in playground
