"""Usage reads; each takes the tenant whose usage it reads."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time

from django.db.models import Count, Q, QuerySet, Sum
from django.utils import timezone

from tenants.models import DailyUsage, Tenant, UsageRecord


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
