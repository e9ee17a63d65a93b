"""Storing prompts and answers, for organisations that turned content logging on.

The settlement hook of the completion path: after a request settles, it calls
``content_log_record(tenant=..., request_id=..., prompt=..., answer=...)`` (synchronous;
wrap it in ``sync_to_async`` from async code). It stores nothing unless the organisation
logs content, and the row expires after the organisation's retention period;
``content_log_purge_expired`` (a daily Celery task) deletes what has expired.
``content_logging_update`` is the organisation's switch and retention setting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.contrib.auth.models import User
from django.db import transaction
from django.utils import timezone

from tenants.errors import ApplicationError
from tenants.models import AuditLogEntry, ContentLogEntry, ContentLoggingPolicy, Tenant
from tenants.selectors.content_logging import DEFAULT_RETENTION_DAYS
from tenants.services.audit_log import audit_log_record

# Generous but bounded: a stored row never grows without limit.
MAX_STORED_CHARS = 100_000
MAX_RETENTION_DAYS = 365


def content_log_record(
    *,
    tenant: Tenant,
    request_id: str,
    prompt: str,
    answer: str,
    now: datetime | None = None,
) -> ContentLogEntry | None:
    """Keep one request's text if the organisation logs content (``content_logs_record``);
    the stored entry (the first one, for a request kept before), None when it does not."""
    content_logs_record([ContentLogItem(tenant, request_id, prompt, answer)], now=now)
    return ContentLogEntry.objects.filter(tenant_id=tenant.pk, request_id=request_id).first()


@dataclass(frozen=True)
class ContentLogItem:
    """One request's text, for ``content_logs_record``."""

    tenant: Tenant
    request_id: str
    prompt: str
    answer: str


def content_logs_record(items: Sequence[ContentLogItem], *, now: datetime | None = None) -> None:
    """Keep the text of each request whose organisation logs content; a request already
    kept is skipped.

    Reads ``log_content`` from the database, not from the items' tenants (which may come
    from the API key cache), so turning logging off takes effect at once: one read when
    none of the organisations logs content (the common case); else, in one transaction, the
    same read again locking those organisations' rows (``content_logging_update`` turning
    logging off waits for it, then deletes what it stored, or goes first and this finds
    logging off) with their retention periods, and one INSERT.
    """
    tenant_ids = {item.tenant.pk for item in items}
    if not tenant_ids or not Tenant.objects.filter(pk__in=tenant_ids, log_content=True).exists():
        return
    now = now or timezone.now()
    with transaction.atomic():
        retention = dict(
            Tenant.objects.select_for_update(no_key=True, of=("self",))
            .filter(pk__in=tenant_ids, log_content=True)
            .order_by("pk")  # one lock order for every writer (names can change)
            .values_list("pk", "content_logging_policy__retention_days")
        )
        entries = [
            ContentLogEntry(
                tenant_id=item.tenant.pk,
                request_id=item.request_id,
                prompt=item.prompt[:MAX_STORED_CHARS],
                answer=item.answer[:MAX_STORED_CHARS],
                expires_at=now
                + timedelta(days=retention[item.tenant.pk] or DEFAULT_RETENTION_DAYS),
            )
            for item in items
            if item.tenant.pk in retention
        ]
        ContentLogEntry.objects.bulk_create(entries, ignore_conflicts=True)


def content_log_purge_expired(*, now: datetime | None = None) -> int:
    """Delete every stored prompt and answer past its organisation's retention period."""
    deleted, _ = ContentLogEntry.objects.filter(expires_at__lte=now or timezone.now()).delete()
    return deleted


@transaction.atomic
def content_logging_update(
    *, tenant: Tenant, enabled: bool, retention_days: int, actor: User
) -> ContentLoggingPolicy:
    """Turn storing prompts and answers on or off and set how long they are kept.

    Turning it off deletes what was stored: off means nothing is kept.
    """
    if not 1 <= retention_days <= MAX_RETENTION_DAYS:
        raise ApplicationError(
            f"Retention must be 1 to {MAX_RETENTION_DAYS} days.",
            code="invalid_value",
            param="retention_days",
        )
    policy, _ = ContentLoggingPolicy.objects.select_for_update().get_or_create(tenant=tenant)
    changed = tenant.log_content != enabled or policy.retention_days != retention_days
    policy.retention_days = retention_days
    policy.save(update_fields=["retention_days", "updated_at"])
    Tenant.objects.filter(pk=tenant.pk).update(log_content=enabled)
    tenant.log_content = enabled
    if not enabled:
        tenant.content_log.all().delete()
    if changed:
        audit_log_record(
            tenant=tenant,
            actor=actor,
            action=AuditLogEntry.Action.CONTENT_LOGGING_CHANGED,
            target="on" if enabled else "off",
            details={"enabled": enabled, "retention_days": retention_days},
        )
    return policy
