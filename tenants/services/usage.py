"""Usage: one record per request, and the daily rollup behind the dashboard's charts."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import ParamSpec

from django.contrib.auth.models import User
from django.db import IntegrityError, connection, transaction
from django.db.models import Aggregate, Count, FloatField, Q, Sum
from django.utils import timezone

from tenants.errors import ApplicationError
from tenants.models import ApiKey, DailyUsage, Tenant, UsageRecord

logger = logging.getLogger(__name__)
P = ParamSpec("P")


def _savepoint_when_in_a_transaction() -> contextlib.AbstractContextManager[object]:
    """What lets one INSERT fail on a duplicate and the connection go on: nothing in
    autocommit (the statement is its own transaction; ``atomic()`` would add a BEGIN and a
    COMMIT, two more round trips to PostgreSQL on every request's settlement), a savepoint
    inside a caller's transaction (a failed statement would otherwise abort it)."""
    if transaction.get_connection().in_atomic_block:
        return transaction.atomic()
    return contextlib.nullcontext()


def usage_record_build(
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
    """One finished request's record (ok, error or cancelled), checked and not yet saved:
    ``usage_record_create`` saves one, ``usage_records_create`` many at once. ``api_key``
    must belong to ``tenant``."""
    if channel not in UsageRecord.Channel.values:
        raise ValueError(f"unknown channel {channel!r}")
    if status not in UsageRecord.Status.values:
        raise ValueError(f"unknown status {status!r}")
    if api_key is not None and api_key.tenant_id != tenant.pk:
        raise ApplicationError(
            "The API key does not belong to this tenant.", code="invalid_value", status=400
        )
    return UsageRecord(
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


def _saved(build: Callable[P, UsageRecord]) -> Callable[P, UsageRecord]:
    @functools.wraps(build)
    def create(*args: P.args, **kwargs: P.kwargs) -> UsageRecord:
        return _usage_record_save(build(*args, **kwargs))

    create.__name__ = create.__qualname__ = "usage_record_create"
    create.__doc__ = """Record one finished request (the keyword arguments of ``usage_record_build``).

    Idempotent on ``request_id``: recording the same request twice (a retried task) returns
    the first record."""
    return create


usage_record_create = _saved(usage_record_build)


def _usage_record_save(record: UsageRecord) -> UsageRecord:
    try:
        with _savepoint_when_in_a_transaction():
            record.save(force_insert=True)
            return record
    except IntegrityError:
        existing = UsageRecord.objects.filter(
            tenant_id=record.tenant_id, request_id=record.request_id
        ).first()
        if existing is None:  # the request id belongs to another tenant: a bug upstream
            raise
        return existing


def usage_records_create(records: Sequence[UsageRecord]) -> list[UsageRecord]:
    """Save built records (``usage_record_build``): one alone as ``usage_record_create``
    does (one statement in autocommit), several in one INSERT (in a transaction, as Django's
    ``bulk_create`` makes it). Idempotent as ``usage_record_create``: when one of them is
    already recorded, each is saved on its own instead (the first record of a request
    stays). The records that could not be saved (their request id is another tenant's:
    a bug upstream, logged); a database error other than a duplicate is raised."""
    if len(records) > 1:
        try:
            with _savepoint_when_in_a_transaction():
                UsageRecord.objects.bulk_create(records)
            return []
        except IntegrityError:
            for record in records:  # bulk_create may have given them ids: none was saved
                record.pk = None
                record._state.adding = True
    failed = []
    for record in records:
        try:
            _usage_record_save(record)
        except IntegrityError:
            logger.exception("recording the usage of request %s failed", record.request_id)
            failed.append(record)
    return failed


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
