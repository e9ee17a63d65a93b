"""Usage reads; each takes the tenant whose usage it reads.

Today's summary (the overview and ``GET /v1/usage``), the request records, the rolled-up days,
and the series the dashboard charts, exports and lists (``usage_daily_series``,
``request_log_for_tenant``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from django.db.models import Count, F, Q, QuerySet, Sum
from django.utils import timezone

from tenants.models import DailyUsage, Tenant, UsageRecord
from tenants.selectors.tenants import served_model_names
from tenants.services.usage import percentile_cont

NO_KEY = "none"  # the key filter value for requests made without a key (the playground)


@dataclass(frozen=True, slots=True)
class UsageTotals:
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    image_count: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class KeyUsage:
    public_id: str | None  # None: requests made without a key (the playground)
    name: str | None
    totals: UsageTotals


@dataclass(frozen=True, slots=True)
class UsageSummary:
    day: date
    totals: UsageTotals
    per_key: list[KeyUsage]


def _utc_midnight(now: datetime) -> datetime:
    return datetime.combine(now.astimezone(UTC).date(), time.min, tzinfo=UTC)


def usage_today_for_tenant(*, tenant: Tenant, now: datetime | None = None) -> UsageSummary:
    """The tenant's usage since UTC midnight, in total and per key (one query)."""
    now = now or timezone.now()
    since = _utc_midnight(now)
    rows = (
        UsageRecord.objects.filter(tenant=tenant, created_at__gte=since)
        .values("api_key__public_id", "api_key__name")
        .annotate(
            requests=Count("id"),
            errors=Count("id", filter=Q(status=UsageRecord.Status.ERROR)),
            prompt_tokens=Sum("prompt_tokens"),
            completion_tokens=Sum("completion_tokens"),
            image_count=Sum("image_count"),
        )
        .order_by("api_key__name", "api_key__public_id")
    )
    per_key = [
        KeyUsage(
            public_id=row["api_key__public_id"],
            name=row["api_key__name"],
            totals=UsageTotals(
                requests=row["requests"],
                errors=row["errors"],
                prompt_tokens=row["prompt_tokens"] or 0,
                completion_tokens=row["completion_tokens"] or 0,
                image_count=row["image_count"] or 0,
            ),
        )
        for row in rows
    ]
    totals = UsageTotals(
        requests=sum(k.totals.requests for k in per_key),
        errors=sum(k.totals.errors for k in per_key),
        prompt_tokens=sum(k.totals.prompt_tokens for k in per_key),
        completion_tokens=sum(k.totals.completion_tokens for k in per_key),
        image_count=sum(k.totals.image_count for k in per_key),
    )
    return UsageSummary(day=since.date(), totals=totals, per_key=per_key)


def usage_records_for_tenant(
    *, tenant: Tenant, since: datetime | None = None
) -> QuerySet[UsageRecord]:
    """The tenant's request records, newest first."""
    records = UsageRecord.objects.filter(tenant=tenant).select_related("api_key")
    if since is not None:
        records = records.filter(created_at__gte=since)
    return records.order_by("-created_at")


def usage_daily_for_tenant(*, tenant: Tenant, start: date, end: date) -> QuerySet[DailyUsage]:
    """The tenant's rolled-up days ``start`` to ``end`` inclusive, oldest first."""
    return (
        DailyUsage.objects.filter(tenant=tenant, day__gte=start, day__lte=end)
        .select_related("api_key")
        .order_by("day", "model")
    )


@dataclass(frozen=True, slots=True)
class UsageFilter:
    api_key: str | None = None  # a key's public id, NO_KEY, or None for all
    model: str | None = None

    def records(self) -> Q:
        query = Q()
        if self.api_key == NO_KEY:
            query &= Q(api_key__isnull=True)
        elif self.api_key:
            query &= Q(api_key__public_id=self.api_key)
        if self.model:
            query &= Q(model=self.model)
        return query


@dataclass(slots=True)
class DayUsage:
    day: date
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)


def usage_daily_series(
    *,
    tenant: Tenant,
    usage_filter: UsageFilter,
    days: int = 30,
    today: date | None = None,
) -> list[DayUsage]:
    """One ``DayUsage`` per UTC day, the last ``days`` days up to today, oldest first.

    Days already rolled up (``DailyUsage``, written after midnight UTC) are read from the
    rollup; today and any day not rolled up yet are computed from ``UsageRecord``. Latency
    percentiles are exact for days computed from records and for a rolled-up day with one row
    (one key and model, as when both filters are set); a rolled-up day with several rows gets
    the request-weighted mean of its rows' percentiles, an approximation said so on the page.
    """
    today = today or timezone.now().astimezone(UTC).date()
    start = today - timedelta(days=days - 1)
    series = {
        start + timedelta(days=i): DayUsage(day=start + timedelta(days=i)) for i in range(days)
    }

    rolled_days = set(
        DailyUsage.objects.filter(tenant=tenant, day__gte=start, day__lt=today)
        .values_list("day", flat=True)
        .distinct()
    )
    rollup_filter = usage_filter.records()
    weighted: dict[date, list[tuple[int, float | None, float | None]]] = defaultdict(list)
    for row in DailyUsage.objects.filter(
        rollup_filter, tenant=tenant, day__in=rolled_days
    ).values_list(
        "day",
        "requests",
        "errors",
        "prompt_tokens",
        "completion_tokens",
        "latency_ms_p50",
        "latency_ms_p95",
    ):
        day, requests, errors, prompt, completion, p50, p95 = row
        entry = series[day]
        entry.requests += requests
        entry.errors += errors
        entry.prompt_tokens += prompt
        entry.completion_tokens += completion
        weighted[day].append((requests, p50, p95))
    for day, rows in weighted.items():
        total = sum(r for r, p50, _ in rows if p50 is not None)
        if total:
            series[day].latency_p50_ms = sum(r * p for r, p, _ in rows if p is not None) / total
            series[day].latency_p95_ms = sum(r * p for r, _, p in rows if p is not None) / total

    open_days = [day for day in series if day not in rolled_days]
    if open_days:
        latencies: dict[date, list[int]] = defaultdict(list)
        records = UsageRecord.objects.filter(
            usage_filter.records(), tenant=tenant, created_at__gte=_midnight(min(open_days))
        ).values_list(
            "created_at", "status", "prompt_tokens", "completion_tokens", "total_latency_ms"
        )
        for created_at, status, prompt, completion, latency in records.iterator():
            day = created_at.astimezone(UTC).date()
            if day in rolled_days or day not in series:
                continue
            entry = series[day]
            entry.requests += 1
            entry.errors += status == UsageRecord.Status.ERROR
            entry.prompt_tokens += prompt
            entry.completion_tokens += completion
            latencies[day].append(latency)
        for day, values in latencies.items():
            series[day].latency_p50_ms = percentile_cont(values, 0.5)
            series[day].latency_p95_ms = percentile_cont(values, 0.95)
    return [series[day] for day in sorted(series)]


def usage_models_for_tenant(*, tenant: Tenant) -> list[str]:
    """Served models and any other model name found in the tenant's records."""
    used = (
        UsageRecord.objects.filter(tenant=tenant)
        .order_by()
        .values_list("model", flat=True)
        .distinct()
    )
    names = list(served_model_names())
    return names + sorted(set(used) - set(names))


def request_log_for_tenant(
    *,
    tenant: Tenant,
    usage_filter: UsageFilter,
    status: str | None = None,
    since: datetime | None = None,
    before: datetime | None = None,
) -> QuerySet[UsageRecord]:
    """The tenant's request records, newest first, filtered; ``since`` inclusive, ``before``
    exclusive. Unsliced: the caller pages it."""
    records = usage_records_for_tenant(tenant=tenant, since=since).filter(usage_filter.records())
    if before is not None:
        records = records.filter(created_at__lt=before)
    if status:
        records = records.filter(status=status)
    return records.select_related("user").order_by("-created_at", "-id")


def usage_record_get_for_tenant(*, tenant: Tenant, request_id: str) -> UsageRecord | None:
    """One of the tenant's request records by its request id (``x-request-id``); None if
    the tenant has none by that id (another tenant's id included)."""
    return (
        UsageRecord.objects.filter(tenant=tenant, request_id=request_id.strip())
        .select_related("api_key", "user")
        .first()
    )


@dataclass(frozen=True, slots=True)
class KeyActivity:
    """One key's requests and tokens today (UTC) and over the last 30 days."""

    requests_today: int = 0
    tokens_today: int = 0
    requests_30d: int = 0
    tokens_30d: int = 0


def usage_by_key_for_tenant(
    *, tenant: Tenant, now: datetime | None = None
) -> dict[int, KeyActivity]:
    """Each of the tenant's keys that was used in the last 30 days, by key id (one query)."""
    now = now or timezone.now()
    today = _utc_midnight(now)
    since = today - timedelta(days=29)
    tokens = F("prompt_tokens") + F("completion_tokens")
    rows = (
        UsageRecord.objects.filter(tenant=tenant, api_key__isnull=False, created_at__gte=since)
        .values("api_key_id")
        .annotate(
            requests_30d=Count("id"),
            tokens_30d=Sum(tokens),
            requests_today=Count("id", filter=Q(created_at__gte=today)),
            tokens_today=Sum(tokens, filter=Q(created_at__gte=today)),
        )
        .order_by()
    )
    return {
        row["api_key_id"]: KeyActivity(
            requests_today=row["requests_today"],
            tokens_today=row["tokens_today"] or 0,
            requests_30d=row["requests_30d"],
            tokens_30d=row["tokens_30d"] or 0,
        )
        for row in rows
    }
