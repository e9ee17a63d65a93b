"""Usage charts data, CSV export, request log, audit log and content logging."""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from tenants.models import AuditLogEntry, ContentLogEntry, UsageRecord
from tenants.services.content_logging import content_log_purge_expired, content_log_record
from tenants.services.usage import usage_record_create, usage_rollup_day
from tests.factories import api_key_for


def _record(tenant, n: int, *, api_key=None, model="glm-4.6v-flash", days_ago=0, **extra):
    return usage_record_create(
        tenant=tenant,
        request_id=f"req-{tenant.pk}-{n}-{days_ago}",
        channel="rest" if api_key else "playground",
        model=model,
        status=extra.pop("status", "ok"),
        api_key=api_key,
        prompt_tokens=10,
        completion_tokens=5,
        total_latency_ms=100 * n,
        created_at=timezone.now() - timedelta(days=days_ago),
        **extra,
    )


def _chart(response) -> dict:
    html = response.content.decode()
    start = html.index(">", html.index('id="usage-data"')) + 1
    return json.loads(html[start : html.index("</script>", start)])


@pytest.mark.django_db
def test_usage_chart_counts_requests_tokens_errors_and_latency(
    client_for, teammate, outsider
) -> None:
    tenant = teammate.tenant
    for n in (1, 2, 3):
        _record(tenant, n)
    _record(tenant, 4, status="error", error_code="image_decode_failed")
    _record(outsider.tenant, 1)  # never counted for Acme
    chart = _chart(client_for(teammate).get(reverse("dashboard:usage", args=[tenant.pk])))
    assert len(chart["labels"]) == 30
    assert chart["requests"][-1] == 4 and sum(chart["requests"]) == 4
    assert chart["errors"][-1] == 1
    assert chart["prompt_tokens"][-1] == 40 and chart["completion_tokens"][-1] == 20
    assert chart["p50"][-1] == 250.0
    assert chart["p95"][-1] == pytest.approx(385.0)


@pytest.mark.django_db
def test_usage_filters_by_key_and_model_and_reads_rolled_up_days(client_for, owner) -> None:
    tenant = owner.tenant
    key = api_key_for(tenant).api_key
    _record(tenant, 1, api_key=key, days_ago=3)
    _record(tenant, 2, days_ago=3)
    _record(tenant, 3, api_key=key, model="ocr-lite")
    usage_rollup_day(day=(timezone.now() - timedelta(days=3)).date())
    url = reverse("dashboard:usage", args=[tenant.pk])
    client = client_for(owner)
    everything = _chart(client.get(url))
    assert sum(everything["requests"]) == 3 and everything["requests"][-4] == 2
    by_key = _chart(client.get(url, {"key": key.public_id}))
    assert sum(by_key["requests"]) == 2
    by_key_and_model = _chart(client.get(url, {"key": key.public_id, "model": "glm-4.6v-flash"}))
    assert by_key_and_model["requests"][-4] == 1 and by_key_and_model["requests"][-1] == 0
    assert by_key_and_model["p50"][-4] == 100.0
    playground_only = _chart(client.get(url, {"key": "none"}))
    assert sum(playground_only["requests"]) == 1


@pytest.mark.django_db
def test_usage_csv_export(client_for, teammate) -> None:
    _record(teammate.tenant, 1)
    response = client_for(teammate).get(reverse("dashboard:usage-csv", args=[teammate.tenant.pk]))
    assert response["Content-Type"].startswith("text/csv")
    assert "attachment" in response["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    assert len(rows) == 30
    assert rows[-1]["requests"] == "1" and rows[-1]["total_tokens"] == "15"


@pytest.mark.django_db
def test_usage_page_shows_quota_use_against_each_limit(client_for, teammate) -> None:
    response = client_for(teammate).get(reverse("dashboard:usage", args=[teammate.tenant.pk]))
    rows = response.context["quota_rows"]
    assert [row["limit"] for row in rows] == [60, 1_000_000, 4]  # PlanFactory's limits


@pytest.mark.django_db
def test_request_log_lists_the_organisations_requests_only(client_for, teammate, outsider) -> None:
    mine = _record(teammate.tenant, 1, cache_hit=True)
    theirs = _record(outsider.tenant, 2)
    html = (
        client_for(teammate)
        .get(reverse("dashboard:requests", args=[teammate.tenant.pk]))
        .content.decode()
    )
    assert mine.request_id in html and theirs.request_id not in html


@pytest.mark.django_db
def test_content_logging_setting_storage_and_who_sees_it(client_for, owner, teammate) -> None:
    tenant = owner.tenant
    record = _record(tenant, 1)
    assert (
        content_log_record(tenant=tenant, request_id=record.request_id, prompt="Q?", answer="A!")
        is None
    )
    response = client_for(owner).post(
        reverse("dashboard:content-logging", args=[tenant.pk]),
        {"enabled": "on", "retention_days": "7"},
    )
    assert response.status_code == 302
    entry = content_log_record(
        tenant=tenant, request_id=record.request_id, prompt="Q?", answer="A!"
    )
    assert entry is not None
    assert entry.expires_at - entry.created_at == pytest.approx(
        timedelta(days=7), abs=timedelta(seconds=5)
    )
    url = reverse("dashboard:requests", args=[tenant.pk])
    assert "A!" in client_for(owner).get(url).content.decode()
    assert "A!" not in client_for(teammate).get(url).content.decode()  # members see counts only
    assert AuditLogEntry.objects.filter(action="content_logging_changed").exists()
    # Past retention it is purged; turning logging off deletes what is left at once.
    assert content_log_purge_expired(now=timezone.now() + timedelta(days=8)) == 1
    content_log_record(tenant=tenant, request_id="again", prompt="Q", answer="A")
    client_for(owner).post(
        reverse("dashboard:content-logging", args=[tenant.pk]), {"retention_days": "7"}
    )
    assert not ContentLogEntry.objects.exists()


@pytest.mark.django_db
def test_plan_change_is_for_owners_and_audited(client_for, owner, org_admin) -> None:
    from tenants.services.tenants import plans_ensure_defaults

    free, pro = plans_ensure_defaults()
    url = reverse("dashboard:plan-change", args=[owner.tenant.pk])
    assert client_for(org_admin).post(url, {"plan": pro.pk}).status_code == 403
    # The first post only asks for confirmation (issue 17); the confirmed one switches.
    assert client_for(owner).post(url, {"plan": pro.pk}).status_code == 200
    assert client_for(owner).post(url, {"plan": pro.pk, "confirm": "yes"}).status_code == 302
    owner.tenant.refresh_from_db()
    assert owner.tenant.plan == pro
    entry = AuditLogEntry.objects.get(action="plan_changed")
    assert entry.details["to"] == "pro"
    audit = client_for(org_admin).get(reverse("dashboard:audit", args=[owner.tenant.pk]))
    assert "Plan changed" in audit.content.decode()


@pytest.mark.django_db
def test_deleting_an_organisation_needs_its_name_and_kills_its_keys(
    client_for, owner, api_client_for
) -> None:
    raw_key = api_key_for(owner.tenant).raw_key
    url = reverse("dashboard:org-delete", args=[owner.tenant.pk])
    client = client_for(owner)
    assert client.post(url, {"confirm_name": "wrong"}).status_code == 200
    assert api_client_for(raw_key).get("/v1/models").status_code == 200
    assert client.post(url, {"confirm_name": "Acme"}).status_code == 302
    assert not UsageRecord.objects.filter(tenant_id=owner.tenant.pk).exists()
    assert api_client_for(raw_key).get("/v1/models").status_code == 401
    assert client.get(reverse("dashboard:overview", args=[owner.tenant.pk])).status_code == 404
