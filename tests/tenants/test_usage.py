"""Usage records, today's summary, the daily rollup; and a tenant's effective limits."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tenants.errors import ApplicationError
from tenants.models import DailyUsage, UsageRecord
from tenants.selectors.tenants import tenant_limits_get
from tenants.selectors.usage import usage_daily_for_tenant, usage_today_for_tenant
from tenants.services.usage import (
    percentile_cont,
    usage_record_build,
    usage_record_create,
    usage_records_create,
    usage_rollup_day,
)
from tenants.tasks import usage_rollup_day_task
from tests.factories import PlanFactory, TenantFactory, api_key_for

pytestmark = pytest.mark.django_db

DAY = date(2030, 1, 2)


def _record(tenant, **fields) -> UsageRecord:  # type: ignore[no-untyped-def]
    values = {
        "request_id": uuid.uuid4().hex,
        "channel": UsageRecord.Channel.REST,
        "model": "glm-4.6v-flash",
        "status": UsageRecord.Status.OK,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_latency_ms": 100,
    }
    values.update(fields)
    return usage_record_create(tenant=tenant, **values)


def test_a_record_is_written_once_per_request_id(owner):
    key = api_key_for(owner.tenant).api_key

    first = _record(owner.tenant, api_key=key, request_id="req-1", image_count=2)
    again = _record(owner.tenant, api_key=key, request_id="req-1", image_count=2)

    assert again.pk == first.pk
    assert UsageRecord.objects.filter(request_id="req-1").count() == 1
    assert first.total_tokens == 15


@pytest.mark.django_db(transaction=True)
def test_in_autocommit_a_record_is_one_statement_and_a_duplicate_leaves_the_connection_usable(
    owner, monkeypatch
):
    """Settlement writes the record in autocommit: no BEGIN/COMMIT around the INSERT (two
    round trips more on every request), and a duplicate still returns the first record."""
    switched: list[bool] = []
    original = connection.set_autocommit

    def recording(autocommit: bool, *args, **kwargs):  # type: ignore[no-untyped-def]
        switched.append(autocommit)
        return original(autocommit, *args, **kwargs)

    monkeypatch.setattr(connection, "set_autocommit", recording)
    assert connection.get_autocommit() and not connection.in_atomic_block

    first = _record(owner.tenant, request_id="req-auto")
    again = _record(owner.tenant, request_id="req-auto")

    assert switched == []  # never left autocommit: no transaction of its own
    assert again.pk == first.pk
    assert UsageRecord.objects.filter(request_id="req-auto").count() == 1


def test_in_a_transaction_a_duplicate_does_not_abort_it(owner):
    first = _record(owner.tenant, request_id="req-tx")
    again = _record(owner.tenant, request_id="req-tx")  # a savepoint took the failure

    assert again.pk == first.pk
    assert UsageRecord.objects.filter(tenant=owner.tenant).count() == 1


def test_a_record_refuses_another_tenants_key(owner, outsider):
    their_key = api_key_for(outsider.tenant).api_key

    with pytest.raises(ApplicationError):
        _record(owner.tenant, api_key=their_key)

    assert not UsageRecord.objects.exists()


def test_today_counts_this_tenant_since_utc_midnight_per_key(owner, outsider):
    now = datetime(2030, 1, 2, 12, 0, tzinfo=UTC)
    ci = api_key_for(owner.tenant, name="ci").api_key
    web = api_key_for(owner.tenant, name="web").api_key
    _record(owner.tenant, api_key=ci, created_at=now - timedelta(hours=1))
    _record(owner.tenant, api_key=ci, created_at=now - timedelta(hours=2), status="error")
    _record(owner.tenant, api_key=web, created_at=now - timedelta(minutes=5), prompt_tokens=100)
    _record(owner.tenant, created_at=now - timedelta(minutes=1))  # the playground: no key
    _record(owner.tenant, api_key=ci, created_at=now - timedelta(hours=13))  # yesterday
    _record(outsider.tenant, created_at=now - timedelta(hours=1), prompt_tokens=10_000)

    summary = usage_today_for_tenant(tenant=owner.tenant, now=now)

    assert summary.day == date(2030, 1, 2)
    assert summary.totals.requests == 4
    assert summary.totals.errors == 1
    assert summary.totals.prompt_tokens == 130
    assert summary.totals.total_tokens == 150
    by_name = {k.name: k.totals for k in summary.per_key}
    assert by_name["ci"].requests == 2
    assert by_name["web"].prompt_tokens == 100
    assert by_name[None].requests == 1


def test_rollup_groups_by_tenant_key_and_model_with_percentiles(owner, outsider):
    key = api_key_for(owner.tenant).api_key
    noon = datetime.combine(DAY, datetime.min.time(), tzinfo=UTC) + timedelta(hours=12)
    latencies = [100, 200, 300, 400, 1000]
    for latency in latencies:
        _record(owner.tenant, api_key=key, total_latency_ms=latency, created_at=noon)
    _record(owner.tenant, api_key=key, model="other", status="error", created_at=noon)
    _record(outsider.tenant, created_at=noon, time_to_first_token_ms=50)
    _record(owner.tenant, api_key=key, created_at=noon + timedelta(days=1))  # not this day

    written = usage_rollup_day(day=DAY)

    assert written == 3
    row = DailyUsage.objects.get(tenant=owner.tenant, api_key=key, model="glm-4.6v-flash")
    assert (row.requests, row.errors, row.prompt_tokens, row.completion_tokens) == (5, 0, 50, 25)
    assert row.latency_ms_sum == sum(latencies)
    assert row.time_to_first_token_ms_sum == 0
    assert row.latency_ms_p50 == pytest.approx(percentile_cont(latencies, 0.5)) == 300
    assert row.latency_ms_p95 == pytest.approx(percentile_cont(latencies, 0.95)) == 880
    assert DailyUsage.objects.get(tenant=owner.tenant, model="other").errors == 1
    assert DailyUsage.objects.get(tenant=outsider.tenant).time_to_first_token_ms_sum == 50
    assert connection.vendor == "postgresql"  # the percentiles above came from PostgreSQL


def test_rolling_a_day_up_again_replaces_its_rows(owner):
    noon = datetime.combine(DAY, datetime.min.time(), tzinfo=UTC) + timedelta(hours=12)
    _record(owner.tenant, created_at=noon)
    usage_rollup_day(day=DAY)
    _record(owner.tenant, created_at=noon)

    result = usage_rollup_day_task.apply(args=[DAY.isoformat()]).get()

    assert result == 1
    rows = usage_daily_for_tenant(tenant=owner.tenant, start=DAY, end=DAY)
    assert [r.requests for r in rows] == [2]


def test_limits_come_from_the_plan_unless_the_tenant_overrides_them(settings, db):
    settings.INFERENCE_MODELS = {"a": {}, "b": {}, "c": {}}
    plan = PlanFactory(
        requests_per_minute=60,
        tokens_per_day=1000,
        allowed_models=["c", "a", "retired"],
        fallback_model="a",
    )
    tenant = TenantFactory(plan=plan, tokens_per_day_override=5000)

    limits = tenant_limits_get(tenant=tenant)

    assert limits.requests_per_minute == 60
    assert limits.tokens_per_day == 5000
    assert limits.allowed_models == ("a", "c")  # served ones only, in settings order
    assert limits.fallback_model == "a"
    assert tenant_limits_get(tenant=TenantFactory()).allowed_models == ("a", "b", "c")


def test_percentile_matches_postgresql_interpolation():
    assert percentile_cont([], 0.5) is None
    assert percentile_cont([7], 0.95) == 7
    assert percentile_cont([1, 2, 3, 4], 0.5) == 2.5


def _built(tenant, request_id: str) -> UsageRecord:  # type: ignore[no-untyped-def]
    return usage_record_build(
        tenant=tenant,
        request_id=request_id,
        channel=UsageRecord.Channel.REST,
        model="glm-4.6v-flash",
        status=UsageRecord.Status.OK,
        completion_tokens=3,
    )


def test_many_records_are_one_insert(owner, outsider):
    batch = [
        _built(owner.tenant, "b-1"),
        _built(outsider.tenant, "b-2"),
        _built(owner.tenant, "b-3"),
    ]

    with CaptureQueriesContext(connection) as queries:
        usage_records_create(batch)

    # In the test's transaction: a savepoint around the one INSERT.
    statements = [q["sql"].split()[0] for q in queries.captured_queries]
    assert statements == ["SAVEPOINT", "INSERT", "RELEASE"]

    assert sorted(UsageRecord.objects.values_list("request_id", "tenant_id")) == [
        ("b-1", owner.tenant.pk),
        ("b-2", outsider.tenant.pk),
        ("b-3", owner.tenant.pk),
    ]


@pytest.mark.django_db(transaction=True)
def test_one_record_alone_is_one_statement_in_autocommit(owner, django_assert_num_queries):
    with django_assert_num_queries(1):
        usage_records_create([_built(owner.tenant, "alone")])
    assert UsageRecord.objects.filter(request_id="alone").count() == 1


def test_a_batch_with_a_recorded_request_keeps_the_first_and_writes_the_rest(
    owner, outsider, caplog
):
    first = _record(owner.tenant, request_id="dup", completion_tokens=7)
    _record(outsider.tenant, request_id="theirs")
    # The same request again, another tenant's request id, and two new ones.
    batch = [
        _built(owner.tenant, "new-1"),
        _built(owner.tenant, "dup"),
        _built(owner.tenant, "theirs"),
        _built(owner.tenant, "new-2"),
    ]

    failed = usage_records_create(batch)

    assert [record.request_id for record in failed] == ["theirs"]
    assert UsageRecord.objects.get(request_id="dup").completion_tokens == first.completion_tokens
    assert UsageRecord.objects.get(request_id="theirs").tenant_id == outsider.tenant.pk
    assert UsageRecord.objects.filter(request_id__in=["new-1", "new-2"]).count() == 2
    assert "recording the usage of request theirs failed" in caplog.text
