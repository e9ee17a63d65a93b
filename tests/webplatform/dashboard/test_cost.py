"""Cost: prices in the plan table, cost per request, spend this month, and a monthly spend
limit an owner sets that admission enforces with its own 429 code."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from tenants.models import Tenant, UsageRecord
from tests.factories import api_key_for


def _on_pro(persona) -> None:
    from tenants.services.tenants import plans_ensure_defaults

    free, pro = plans_ensure_defaults()
    pro.price_per_1k_tokens = Decimal("0.002")
    pro.save()
    Tenant.objects.filter(pk=persona.tenant.pk).update(plan=pro)
    persona.tenant.refresh_from_db()


def _used(persona, tokens: int, request_id: str = "req_cost") -> UsageRecord:
    return UsageRecord.objects.create(
        tenant=persona.tenant,
        request_id=request_id,
        channel="rest",
        model="glm-4.6v-flash",
        status="ok",
        prompt_tokens=tokens - 500,
        completion_tokens=500,
        created_at=timezone.now(),
    )


@pytest.mark.django_db
def test_prices_costs_and_spend_on_the_dashboard(owner, org_admin, client_for) -> None:
    _on_pro(owner)
    _used(owner, 1_500_000)  # 1,500 x 1K tokens at $0.002: $3.00
    client = client_for(owner)
    overview = client.get(reverse("dashboard:overview", args=[owner.tenant.pk]))
    assert "$3.00" in overview.content.decode()
    settings_page = client.get(reverse("dashboard:settings", args=[owner.tenant.pk]))
    assert "$49.00" in settings_page.content.decode()  # pro's monthly price
    log = client.get(reverse("dashboard:requests", args=[owner.tenant.pk]))
    assert log.context["rows"][0]["cost"] == Decimal("3")
    detail = client.get(reverse("dashboard:request-detail", args=[owner.tenant.pk, "req_cost"]))
    assert "$3.00" in detail.content.decode()

    url = reverse("dashboard:spend-limit", args=[owner.tenant.pk])
    assert client_for(org_admin).post(url, {"limit": "1"}).status_code == 403
    assert client.post(url, {"limit": "-1"}).status_code == 400
    assert client.post(url, {"limit": "2.50"}).status_code == 302
    assert Tenant.objects.get(pk=owner.tenant.pk).monthly_spend_limit == Decimal("2.50")
    assert client.post(url, {"limit": ""}).status_code == 302
    assert Tenant.objects.get(pk=owner.tenant.pk).monthly_spend_limit is None


@pytest.mark.django_db(transaction=True)
def test_a_reached_spend_limit_refuses_requests_with_its_own_429(owner, api_client_for) -> None:
    from tenants.errors import ApplicationError
    from tenants.services.spend import spend_limit_check, spend_limit_set

    _on_pro(owner)
    key = api_key_for(owner.tenant).raw_key
    _used(owner, 1_500_000)  # $3.00 this month
    spend_limit_set(tenant=owner.tenant, limit=Decimal("10"), actor=owner.user)
    spend_limit_check(tenant_id=owner.tenant.pk)  # under the limit: no refusal
    spend_limit_set(tenant=owner.tenant, limit=Decimal("2.00"), actor=owner.user)
    with pytest.raises(ApplicationError):
        spend_limit_check(tenant_id=owner.tenant.pk)
    body = {"model": "glm-4.6v-flash", "messages": [{"role": "user", "content": "hi"}]}
    refused = api_client_for(key).post("/v1/chat/completions", body, format="json")
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert (error["code"], error["type"]) == ("spend_limit_exceeded", "insufficient_quota")
    assert "3.00 of 2.00 USD" in error["message"]
    # The refusal shows in the organisation's usage like every other (issue 17, item 5).
    assert UsageRecord.objects.filter(
        tenant=owner.tenant, error_code="spend_limit_exceeded"
    ).exists()
    # No limit: nothing is refused.
    spend_limit_set(tenant=owner.tenant, limit=None, actor=owner.user)
    spend_limit_check(tenant_id=owner.tenant.pk)
