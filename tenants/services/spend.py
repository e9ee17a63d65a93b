"""What an organisation spends on tokens, and its monthly spend limit.

Cost is tokens (prompt and completion) times the plan's ``price_per_1k_tokens`` / 1,000, at
the plan's current price; the month is the calendar month in UTC. An owner may set a
``monthly_spend_limit``: once this month's spend reaches it, admission refuses new requests
with 429 ``spend_limit_exceeded`` (type ``insufficient_quota``, no retry before the next
month or a higher limit). Each web process reads the database at most once per
``SPEND_CHECK_CACHE_SECONDS`` (30 by default) per organisation (only the limit when there
is none), so a burst may overshoot the limit by what it spends in that time.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from decimal import Decimal

from django.conf import settings
from django.contrib.auth.models import User
from django.db import transaction
from django.db.models import F, Sum
from django.utils import timezone

from tenants.errors import ApplicationError
from tenants.models import AuditLogEntry, Plan, Tenant, UsageRecord
from tenants.services.audit_log import audit_log_record

THOUSAND = Decimal(1000)


def month_start(now: datetime | None = None) -> datetime:
    now = (now or timezone.now()).astimezone(UTC)
    return datetime(now.year, now.month, 1, tzinfo=UTC)


def tokens_cost(*, tokens: int, plan: Plan) -> Decimal:
    """The price of ``tokens`` on ``plan``."""
    return Decimal(tokens) * plan.price_per_1k_tokens / THOUSAND


def _tokens_this_month(tenant_id: int, now: datetime | None = None) -> int:
    total = UsageRecord.objects.filter(
        tenant_id=tenant_id, created_at__gte=month_start(now)
    ).aggregate(tokens=Sum(F("prompt_tokens") + F("completion_tokens")))["tokens"]
    return int(total or 0)


def spend_this_month(*, tenant: Tenant, now: datetime | None = None) -> Decimal:
    """This calendar month's (UTC) token spend of the organisation, at its plan's price."""
    return tokens_cost(tokens=_tokens_this_month(tenant.pk, now), plan=tenant.plan)


# Per process: tenant id -> (monotonic deadline, month, limit, spent). Process-local, not in
# Redis, so the check adds no round trip to a request (the request path counts them).
_checked: dict[int, tuple[float, str, Decimal | None, Decimal]] = {}
_checked_lock = threading.Lock()


def spend_limit_check(*, tenant_id: int) -> None:
    """Refuse (429 ``spend_limit_exceeded``) when this month's spend has reached the
    organisation's limit. Reads the limit and the spend afresh at most every
    ``SPEND_CHECK_CACHE_SECONDS`` per process."""
    month = f"{month_start():%Y-%m}"
    now = time.monotonic()
    with _checked_lock:
        entry = _checked.get(tenant_id)
    if entry is None or entry[0] <= now or entry[1] != month:
        row = (
            Tenant.objects.filter(pk=tenant_id)
            .values_list("monthly_spend_limit", "plan__price_per_1k_tokens")
            .first()
        )
        limit, price = row if row else (None, Decimal(0))
        spent = (
            Decimal(_tokens_this_month(tenant_id)) * (price or 0) / THOUSAND
            if limit is not None
            else Decimal(0)
        )
        entry = (
            now + getattr(settings, "SPEND_CHECK_CACHE_SECONDS", 30),
            month,
            limit,
            spent,
        )
        with _checked_lock:
            _checked[tenant_id] = entry
    _deadline, _month, limit, spent = entry
    if limit is not None and spent >= limit:
        raise ApplicationError(
            f"Monthly spend limit reached: {spent:.2f} of {limit:.2f} USD spent this month. "
            "An owner can raise the limit on the dashboard's Settings page.",
            code="spend_limit_exceeded",
            type="insufficient_quota",
            status=429,
            headers={"x-should-retry": "false"},
        )


@transaction.atomic
def spend_limit_set(*, tenant: Tenant, limit: Decimal | None, actor: User) -> Tenant:
    """Set (or, with None, remove) the organisation's monthly spend limit; effective for
    new requests within ``SPEND_CHECK_CACHE_SECONDS``, at once in this process. A change
    is recorded in the audit log (amounts in US dollars, as text: JSON has no decimal)."""
    previous = tenant.monthly_spend_limit
    Tenant.objects.filter(pk=tenant.pk).update(monthly_spend_limit=limit)
    tenant.monthly_spend_limit = limit
    if limit != previous:
        audit_log_record(
            tenant=tenant,
            actor=actor,
            action=AuditLogEntry.Action.SPEND_LIMIT_CHANGED,
            details={
                "from": None if previous is None else f"${previous:.2f}",
                "to": None if limit is None else f"${limit:.2f}",
            },
        )
    with _checked_lock:
        _checked.pop(tenant.pk, None)
    return tenant
