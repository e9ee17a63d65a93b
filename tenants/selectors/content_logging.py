"""Content logging reads: an organisation's retention period and its stored prompts."""

from __future__ import annotations

from django.utils import timezone

from tenants.models import ContentLogEntry, ContentLoggingPolicy, Tenant

DEFAULT_RETENTION_DAYS = 30


def content_retention_days_get(*, tenant: Tenant) -> int:
    policy = ContentLoggingPolicy.objects.filter(tenant=tenant).first()
    return policy.retention_days if policy else DEFAULT_RETENTION_DAYS


def content_log_by_request(*, tenant: Tenant, request_ids: list[str]) -> dict[str, ContentLogEntry]:
    """The tenant's unexpired stored prompts and answers of these requests, by request id."""
    entries = ContentLogEntry.objects.filter(
        tenant=tenant, request_id__in=request_ids, expires_at__gt=timezone.now()
    )
    return {entry.request_id: entry for entry in entries}
