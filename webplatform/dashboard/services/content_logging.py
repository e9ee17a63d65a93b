"""Storing prompts and answers, for organisations that turned content logging on.

The hook for the completion path: after a request settles, call
``content_log_record(tenant=..., request_id=..., prompt=..., answer=...)`` (synchronous;
wrap it in ``sync_to_async`` from async code). It stores nothing unless the organisation
logs content, and the row expires after the organisation's retention period;
``content_log_purge_expired`` (a daily Celery task) deletes what has expired.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.db import IntegrityError, transaction
from django.utils import timezone

from tenants.models import ContentLogEntry, Tenant
from webplatform.dashboard.selectors.organisations import content_retention_days_get

# Generous but bounded: a stored row never grows without limit.
MAX_STORED_CHARS = 100_000


def content_log_record(
    *,
    tenant: Tenant,
    request_id: str,
    prompt: str,
    answer: str,
    now: datetime | None = None,
) -> ContentLogEntry | None:
    """Keep the request's text if the organisation logs content; None when it does not.

    Reads ``log_content`` from the database, not from ``tenant`` (which may come from the
    API key cache), so turning logging off takes effect at once. Idempotent per request.
    """
    if not Tenant.objects.filter(pk=tenant.pk, log_content=True).exists():
        return None
    now = now or timezone.now()
    expires_at = now + timedelta(days=content_retention_days_get(tenant=tenant))
    try:
        with transaction.atomic():
            return ContentLogEntry.objects.create(
                tenant_id=tenant.pk,
                request_id=request_id,
                prompt=prompt[:MAX_STORED_CHARS],
                answer=answer[:MAX_STORED_CHARS],
                expires_at=expires_at,
            )
    except IntegrityError:
        return ContentLogEntry.objects.filter(tenant_id=tenant.pk, request_id=request_id).first()


def content_log_purge_expired(*, now: datetime | None = None) -> int:
    """Delete every stored prompt and answer past its organisation's retention period."""
    deleted, _ = ContentLogEntry.objects.filter(expires_at__lte=now or timezone.now()).delete()
    return deleted
