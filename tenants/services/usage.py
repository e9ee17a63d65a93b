"""Usage: one record per request, and the daily rollup behind the dashboard's charts."""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta

from django.contrib.auth.models import User
from django.db import IntegrityError, connection, transaction
from django.db.models import Aggregate, Count, FloatField, Q, Sum
from django.utils import timezone

from tenants.errors import ApplicationError
from tenants.models import ApiKey, DailyUsage, Tenant, UsageRecord


def _savepoint_when_in_a_transaction() -> contextlib.AbstractContextManager[object]:
    """What lets one INSERT fail on a duplicate and the connection go on: nothing in
    autocommit (the statement is its own transaction; ``atomic()`` would add a BEGIN and a
    COMMIT, two more round trips to PostgreSQL on every request's settlement), a savepoint
    inside a caller's transaction (a failed statement would otherwise abort it)."""
    if transaction.get_connection().in_atomic_block:
        return transaction.atomic()
    return contextlib.nullcontext()


def usage_record_create(
    *,
    tenant: Tenant,
    request_id: str,
    channel: str,
    model: str,
    status: str,
    api_key: ApiKey | None = None,
    user: User | None = None,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    image_tokens: int = 0,
    image_count: int = 0,
    image_bytes: int = 0,
    time_to_first_token_ms: int | None = None,
    total_latency_ms: int = 0,
    error_code: str = "",
    cache_hit: bool = False,
    route_rule: str = "",
    escalated_from: str = "",
    escalated_prompt_tokens: int = 0,
    escalated_completion_tokens: int = 0,
    created_at: datetime | None = None,
) -> UsageRecord:
    """Record one finished request (ok, error or cancelled).

    Idempotent on ``request_id``: recording the same request twice (a retried task) returns
    the first record. ``api_key`` must belong to ``tenant``.
    """
    if channel not in UsageRecord.Channel.values:
        raise ValueError(f"unknown channel {channel!r}")
    if status not in UsageRecord.Status.values:
        raise ValueError(f"unknown status {status!r}")
    if api_key is not None and api_key.tenant_id != tenant.pk:
        raise ApplicationError(
            "The API key does not belong to this tenant.", code="invalid_value", status=400
        )
    try:
        with _savepoint_when_in_a_transaction():
            return UsageRecord.objects.create(
                tenant=tenant,
                api_key=api_key,
                user=user,
                request_id=request_id,
                channel=channel,
                model=model,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                image_tokens=image_tokens,
                image_count=image_count,
                image_bytes=image_bytes,
                time_to_first_token_ms=time_to_first_token_ms,
                total_latency_ms=total_latency_ms,
                status=status,
                error_code=error_code,
                cache_hit=cache_hit,
                route_rule=route_rule,
                escalated_from=escalated_from,
                escalated_prompt_tokens=escalated_prompt_tokens,
                escalated_completion_tokens=escalated_completion_tokens,
                created_at=created_at or timezone.now(),
            )
    except IntegrityError:
        existing = UsageRecord.objects.filter(tenant=tenant, request_id=request_id).first()
        if existing is None:  # the request id belongs to another tenant: a bug upstream
            raise
        return existing


class _PercentileCont(Aggregate):
    """PostgreSQL's ``percentile_cont(fraction) WITHIN GROUP (ORDER BY expression)``."""

    function = "PERCENTILE_CONT"
    template = "%(function)s(%(fraction)s) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = FloatField()

    def __init__(self, expression: str, *, fraction: float) -> None:
        super().__init__(expression, fraction=repr(float(fraction)))


def percentile_cont(values: Sequence[float], fraction: float) -> float | None:
    """The continuous percentile of ``values`` (linear interpolation), as PostgreSQL's
    ``percentile_cont`` computes it; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _day_bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime.combine(day, time.min, tzinfo=UTC)
    return start, start + timedelta(days=1)


@transaction.atomic
def usage_rollup_day(*, day: date) -> int:
    """Rebuild the ``DailyUsage`` rows of one UTC day from its records, for every tenant.

    Delete-and-insert in one transaction, so rerunning a day is harmless. Latency
    percentiles are computed by PostgreSQL; other databases (SQLite in the embedded mode,
    with little data) compute them here. Returns the number of rows written.
    """
    start, end = _day_bounds(day)
    records = UsageRecord.objects.filter(created_at__gte=start, created_at__lt=end)
    group = ("tenant_id", "api_key_id", "model")
    aggregates = {
        "requests": Count("id"),
        "errors": Count("id", filter=Q(status=UsageRecord.Status.ERROR)),
        "cancelled": Count("id", filter=Q(status=UsageRecord.Status.CANCELLED)),
        "cache_hits": Count("id", filter=Q(cache_hit=True)),
        "prompt_tokens": Sum("prompt_tokens"),
        "completion_tokens": Sum("completion_tokens"),
        "image_tokens": Sum("image_tokens"),
        "image_count": Sum("image_count"),
        "image_bytes": Sum("image_bytes"),
        "latency_ms_sum": Sum("total_latency_ms"),
        "time_to_first_token_ms_sum": Sum("time_to_first_token_ms"),
    }
    in_database = connection.vendor == "postgresql"
    if in_database:
        aggregates["latency_ms_p50"] = _PercentileCont("total_latency_ms", fraction=0.5)
        aggregates["latency_ms_p95"] = _PercentileCont("total_latency_ms", fraction=0.95)
    rows = list(records.values(*group).annotate(**aggregates).order_by(*group))
    if not in_database:
        latencies: dict[tuple[int, int | None, str], list[int]] = defaultdict(list)
        for tenant_id, api_key_id, model, latency in records.values_list(
            "tenant_id", "api_key_id", "model", "total_latency_ms"
        ).iterator():
            latencies[(tenant_id, api_key_id, model)].append(latency)
        for row in rows:
            values = latencies[(row["tenant_id"], row["api_key_id"], row["model"])]
            row["latency_ms_p50"] = percentile_cont(values, 0.5)
            row["latency_ms_p95"] = percentile_cont(values, 0.95)

    # A Sum over no non-null values is None (time to first token of failed requests).
    sums = {name for name, aggregate in aggregates.items() if isinstance(aggregate, Sum)}
    DailyUsage.objects.filter(day=day).delete()
    DailyUsage.objects.bulk_create(
        DailyUsage(
            day=day,
            **{name: 0 if name in sums and value is None else value for name, value in row.items()},
        )
        for row in rows
    )
    return len(rows)
