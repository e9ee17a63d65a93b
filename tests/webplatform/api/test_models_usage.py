"""/v1/models, /v1/usage, rate-limit headers, 429s and OpenAI-shaped errors over HTTP."""

from __future__ import annotations

import uuid

import pytest
from django.test import RequestFactory

from tenants.models import UsageRecord
from tenants.quota_stores import LocalQuotaStore, quota_store_get
from tenants.services.quotas import RATE_LIMIT_HEADER_NAMES
from tenants.services.usage import usage_record_create
from tests.factories import PlanFactory, TenantFactory, api_key_for
from webplatform.api.errors import not_found, server_error

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.webplatform.api.urls_testing")]


def _assert_openai_error(response, status: int, code: str) -> dict:  # type: ignore[no-untyped-def]
    assert response.status_code == status
    assert response["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert error["message"]
    return error


def _has_rate_limit_headers(response) -> bool:  # type: ignore[no-untyped-def]
    return all(name in response for name in RATE_LIMIT_HEADER_NAMES)


@pytest.fixture
def key(owner):  # type: ignore[no-untyped-def]
    return api_key_for(owner.tenant).raw_key


def test_models_list_is_in_openai_format(key, api_client_for, settings):
    response = api_client_for(key).get("/v1/models")

    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == list(settings.INFERENCE_MODELS)
    model = body["data"][0]
    assert model["object"] == "model"
    assert isinstance(model["created"], int)
    assert isinstance(model["owned_by"], str)
    assert _has_rate_limit_headers(response)


def test_a_model_is_retrieved_by_id(key, api_client_for):
    response = api_client_for(key).get("/v1/models/glm-4.6v-flash")

    assert response.status_code == 200
    assert response.json()["id"] == "glm-4.6v-flash"
    assert _has_rate_limit_headers(response)


def test_the_plans_allowed_models_limit_the_list(api_client_for, settings, db):
    settings.INFERENCE_MODELS = {"small": {}, "large": {}}
    tenant = TenantFactory(plan=PlanFactory(allowed_models=["small"]))
    client = api_client_for(api_key_for(tenant).raw_key)

    listed = [m["id"] for m in client.get("/v1/models").json()["data"]]
    missing = client.get("/v1/models/large")

    assert listed == ["small"]
    _assert_openai_error(missing, 404, "model_not_found")
    assert _has_rate_limit_headers(missing)


def test_get_endpoints_carry_headers_but_consume_nothing(owner, key, api_client_for):
    client = api_client_for(key)
    limit = str(owner.tenant.plan.requests_per_minute)

    first = client.get("/v1/models")
    second = client.get("/v1/usage")
    admitted = client.post(
        "/v1/test/admit", {"reserve_tokens": 50, "used_tokens": 7}, format="json"
    )
    after = client.get("/v1/models")

    assert first["x-ratelimit-remaining-requests"] == limit
    assert second["x-ratelimit-remaining-requests"] == limit
    assert admitted.status_code == 200
    assert admitted["x-ratelimit-remaining-requests"] == str(int(limit) - 1)
    assert after["x-ratelimit-remaining-requests"] == str(int(limit) - 1)
    tokens = owner.tenant.plan.tokens_per_day
    assert after["x-ratelimit-remaining-tokens"] == str(tokens - 7)  # settled to what was used


@pytest.mark.parametrize(
    ("plan_limits", "body", "code", "error_type"),
    [
        ({"requests_per_minute": 1}, {}, "rate_limit_exceeded", "rate_limit_error"),
        (
            {"tokens_per_day": 100},
            {"reserve_tokens": 60, "used_tokens": 60},
            "tokens_quota_exceeded",
            "insufficient_quota",
        ),
        (
            {"concurrent_requests": 1},
            {"hold": True},
            "concurrency_limit_exceeded",
            "rate_limit_error",
        ),
    ],
    ids=["requests", "tokens", "concurrency"],
)
def test_every_429_has_its_code_the_six_headers_and_retry_after(
    api_client_for, db, plan_limits, body, code, error_type
):
    tenant = TenantFactory(plan=PlanFactory(**plan_limits))
    client = api_client_for(api_key_for(tenant).raw_key)
    assert client.post("/v1/test/admit", body, format="json").status_code == 200

    refused = client.post("/v1/test/admit", body, format="json")

    error = _assert_openai_error(refused, 429, code)
    assert error["type"] == error_type
    assert _has_rate_limit_headers(refused)
    assert int(refused["retry-after"]) >= 1


def test_usage_shows_this_tenant_only(owner, outsider, api_client_for):
    mine = api_key_for(owner.tenant, name="mine")
    theirs = api_key_for(outsider.tenant, name="theirs")
    for tenant, api_key, tokens in [
        (owner.tenant, mine.api_key, 10),
        (owner.tenant, mine.api_key, 20),
        (outsider.tenant, theirs.api_key, 5000),
    ]:
        usage_record_create(
            tenant=tenant,
            api_key=api_key,
            request_id=uuid.uuid4().hex,
            channel=UsageRecord.Channel.REST,
            model="glm-4.6v-flash",
            status=UsageRecord.Status.OK,
            prompt_tokens=tokens,
            completion_tokens=1,
        )

    response = api_client_for(mine.raw_key).get("/v1/usage")

    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "usage"
    assert body["usage"]["requests"] == 2
    assert body["usage"]["total_tokens"] == 32
    assert [(k["key_id"], k["name"]) for k in body["keys"]] == [(mine.api_key.public_id, "mine")]
    assert theirs.api_key.public_id not in response.content.decode()
    limits = body["rate_limits"]
    assert limits["requests"]["limit"] == owner.tenant.plan.requests_per_minute
    assert limits["tokens"]["remaining"] == owner.tenant.plan.tokens_per_day
    assert limits["concurrent_requests"]["in_flight"] == 0
    assert _has_rate_limit_headers(response)
    their_view = api_client_for(theirs.raw_key).get("/v1/usage").json()
    assert their_view["usage"]["total_tokens"] == 5001


def test_unknown_v1_paths_are_json_404s(key, api_client_for):
    anonymous = api_client_for(None).get("/v1/nope")
    with_key = api_client_for(key).post("/v1/engines/x/completions", {}, format="json")

    _assert_openai_error(anonymous, 404, "not_found")
    _assert_openai_error(with_key, 404, "not_found")
    assert _has_rate_limit_headers(with_key)
    assert not _has_rate_limit_headers(anonymous)


def test_a_bad_key_on_an_unknown_path_is_still_401(api_client_for, db):
    _assert_openai_error(api_client_for("sk_bad").get("/v1/nope"), 401, "invalid_api_key")


def test_wrong_method_is_json_405(key, api_client_for):
    response = api_client_for(key).post("/v1/models", {}, format="json")

    _assert_openai_error(response, 405, "method_not_allowed")
    assert _has_rate_limit_headers(response)


def test_drf_validation_errors_are_openai_errors_with_param(key, api_client_for):
    response = api_client_for(key).post("/v1/test/admit", {"reserve_tokens": -1}, format="json")

    error = _assert_openai_error(response, 400, "invalid_value")
    assert error["param"] == "reserve_tokens"
    assert error["type"] == "invalid_request_error"


def test_malformed_json_is_an_openai_error(key, api_client_for):
    response = api_client_for(key).post(
        "/v1/test/admit", "{not json", content_type="application/json"
    )

    _assert_openai_error(response, 400, "invalid_json")


def test_an_unexpected_exception_is_a_json_500(key, api_client_for):
    response = api_client_for(key).get("/v1/test/boom")

    error = _assert_openai_error(response, 500, "internal_error")
    assert error["type"] == "server_error"
    assert "boom" not in error["message"]


def test_django_level_404_and_500_handlers_answer_json_under_v1_only():
    factory = RequestFactory()

    api_404 = not_found(factory.get("/v1/x"), None)
    site_404 = not_found(factory.get("/dashboard/x"), None)
    api_500 = server_error(factory.get("/v1/x"))

    assert api_404.status_code == 404 and api_404["Content-Type"] == "application/json"
    assert site_404.status_code == 404 and "text/html" in site_404["Content-Type"]
    assert api_500.status_code == 500 and api_500["Content-Type"] == "application/json"


def test_embedded_mode_gives_the_same_answers_from_this_process(owner, api_client_for, settings):
    settings.REDIS_URL = ""  # the embedded mode: process-local cache and quota store
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    client = api_client_for(api_key_for(owner.tenant).raw_key)
    limit = owner.tenant.plan.requests_per_minute

    admitted = client.post("/v1/test/admit", {}, format="json")
    models = client.get("/v1/models")

    assert admitted.status_code == 200
    assert models.status_code == 200
    assert models["x-ratelimit-remaining-requests"] == str(limit - 1)
    assert isinstance(quota_store_get(), LocalQuotaStore)


@pytest.mark.parametrize("path", ["/v1/models", "/v1/usage", "/v1/no-such-path", "/health/live"])
def test_every_response_carries_a_request_id(path, api_client_for, key) -> None:
    response = api_client_for(key).get(path)
    assert response["x-request-id"].startswith("req_")


def test_auto_is_listed_with_a_slow_model_and_retrievable_when_usable(api_client_for, settings, db):
    settings.INFERENCE_MODELS = {"small": {}, "large": {}, "other": {}}
    settings.ROUTING = {"fast_model": "small", "slow_model": "large"}
    client = api_client_for(api_key_for(TenantFactory(plan=PlanFactory())).raw_key)

    listed = client.get("/v1/models").json()["data"]
    auto = client.get("/v1/models/auto")

    assert [m["id"] for m in listed] == ["small", "large", "other", "auto"]
    assert auto.status_code == 200
    assert auto.json() == {"id": "auto", "object": "model", "created": 0, "owned_by": "system"}

    # Without a slow model "auto" is the fast model under another name: still accepted, so
    # retrievable, but not offered as a choice.
    settings.ROUTING = {"fast_model": "small", "slow_model": ""}
    assert "auto" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert client.get("/v1/models/auto").status_code == 200

    # A plan that allows neither routed model: neither listed nor retrievable.
    settings.ROUTING = {"fast_model": "small", "slow_model": "large"}
    other_only = api_client_for(
        api_key_for(TenantFactory(plan=PlanFactory(allowed_models=["other"]))).raw_key
    )
    assert [m["id"] for m in other_only.get("/v1/models").json()["data"]] == ["other"]
    _assert_openai_error(other_only.get("/v1/models/auto"), 404, "model_not_found")
