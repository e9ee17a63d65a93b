"""The answer cache over HTTP: deterministic requests only, per tenant, with opt-outs."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tenants.models import UsageRecord
from tests.factories import PlanFactory, TenantFactory
from tests.webplatform.live_server import usage_records
from tests.webplatform.uploads import corpus

pytest_plugins = ["tests.webplatform.live_server"]  # live_asgi_server and friends

TOKENS_PER_DAY = 100_000


def _body(**extra: Any) -> dict[str, Any]:
    image = corpus.data_uri(corpus.encode(corpus.solid(corpus.RED, (40, 40)), "PNG"))
    content = [
        {"type": "text", "text": "Describe the image."},
        {"type": "image_url", "image_url": {"url": image}},
    ]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 6, **extra}


def _client(server: Any) -> httpx.Client:
    tenant = TenantFactory(plan=PlanFactory(tokens_per_day=TOKENS_PER_DAY))
    return server.client_for(tenant)


@pytest.fixture
def tenant_a(live_asgi_server) -> httpx.Client:  # type: ignore[no-untyped-def]
    with _client(live_asgi_server) as client:
        yield client


@pytest.fixture
def tenant_b(live_asgi_server) -> httpx.Client:  # type: ignore[no-untyped-def]
    with _client(live_asgi_server) as client:
        yield client


def _ask(client: httpx.Client, body: dict[str, Any], **headers: str) -> httpx.Response:
    response = client.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return response


def _text(response: httpx.Response) -> str:
    return response.json()["choices"][0]["message"]["content"]


def _record(response: httpx.Response) -> UsageRecord:
    return usage_records().get(request_id=response.headers["x-request-id"])


@pytest.mark.parametrize(
    "sampling", [{"temperature": 0}, {"temperature": 0.9, "seed": 7}], ids=["greedy", "seeded"]
)
def test_a_deterministic_request_is_answered_from_the_cache(tenant_a, sampling):
    first = _ask(tenant_a, _body(**sampling))
    tokens_after_first = tenant_a.get("/v1/usage").json()["rate_limits"]["tokens"]["remaining"]
    second = _ask(tenant_a, _body(**sampling))

    assert first.headers["x-cache"] == "miss"
    assert second.headers["x-cache"] == "hit"
    assert second.content != first.content  # its own id and created time...
    assert _text(second).encode() == _text(first).encode()  # ...and the very same answer
    assert second.json()["usage"] == first.json()["usage"]
    assert second.json()["id"] != first.json()["id"]
    assert (_record(first).cache_hit, _record(second).cache_hit) == (False, True)
    assert _record(second).status == "ok"
    # A hit costs no model tokens.
    limits = tenant_a.get("/v1/usage").json()["rate_limits"]
    assert limits["tokens"]["remaining"] == tokens_after_first


def test_a_cached_answer_streams_the_same_text(tenant_a):
    first = _ask(tenant_a, _body(temperature=0))

    with tenant_a.stream(
        "POST", "/v1/chat/completions", json=_body(temperature=0, stream=True)
    ) as r:
        assert r.headers["x-cache"] == "hit"
        chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == _text(first)
    assert chunks[-1]["choices"][0]["finish_reason"] == first.json()["choices"][0]["finish_reason"]


def test_the_cache_never_crosses_tenants(tenant_a, tenant_b):
    _ask(tenant_a, _body(temperature=0))
    assert _ask(tenant_a, _body(temperature=0)).headers["x-cache"] == "hit"

    other = _ask(tenant_b, _body(temperature=0))

    assert other.headers["x-cache"] == "miss"
    assert _record(other).cache_hit is False
    assert _ask(tenant_b, _body(temperature=0)).headers["x-cache"] == "hit"


OPT_OUTS = {
    "cache false": ({"cache": False}, {}),
    "no-store": ({}, {"Cache-Control": "no-store"}),
    "no-cache": ({}, {"Cache-Control": "max-age=0, no-cache"}),
}


def test_a_client_can_opt_out_of_the_cache(tenant_a, subtests):
    for max_tokens, (name, (extra, headers)) in enumerate(OPT_OUTS.items(), start=2):
        with subtests.test(opt_out=name):
            body = _body(temperature=0, max_tokens=max_tokens, **extra)  # its own entry
            opted_out = _ask(tenant_a, body, **headers)
            again = _ask(tenant_a, body, **headers)

            assert (opted_out.headers["x-cache"], again.headers["x-cache"]) == ("miss", "miss")
            assert not usage_records().filter(cache_hit=True).exists()
            # Nothing was stored either: the first ordinary request still goes to the model.
            plain = _ask(tenant_a, _body(temperature=0, max_tokens=max_tokens))
            assert plain.headers["x-cache"] == "miss"


def test_a_non_deterministic_request_is_never_cached(tenant_a):
    for _ in range(2):
        assert _ask(tenant_a, _body(temperature=0.9)).headers["x-cache"] == "miss"
    assert _ask(tenant_a, _body()).headers["x-cache"] == "miss"  # default temperature is 1

    assert not usage_records().filter(cache_hit=True).exists()


def test_a_different_image_or_parameter_is_a_different_entry(tenant_a):
    _ask(tenant_a, _body(temperature=0))
    other_image = _body(temperature=0)
    other_image["messages"][0]["content"][1]["image_url"]["url"] = corpus.data_uri(
        corpus.encode(corpus.solid(corpus.BLUE, (40, 40)), "PNG")
    )

    assert _ask(tenant_a, other_image).headers["x-cache"] == "miss"
    assert _ask(tenant_a, _body(temperature=0, max_tokens=5)).headers["x-cache"] == "miss"
    assert _ask(tenant_a, _body(temperature=0)).headers["x-cache"] == "hit"
