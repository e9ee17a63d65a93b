"""Audit log reads: an organisation's administrative actions, newest first."""

from __future__ import annotations

from datetime import datetime

from django.db.models import QuerySet

from tenants.models import AuditLogEntry, Tenant


def audit_log_for_tenant(*, tenant: Tenant, limit: int = 200) -> list[AuditLogEntry]:
    return list(
        AuditLogEntry.objects.filter(tenant=tenant)
        .select_related("actor")
        .order_by("-created_at", "-id")[:limit]
    )


def audit_log_query(
    *, tenant: Tenant, since: datetime | None = None, before: datetime | None = None
) -> QuerySet[AuditLogEntry]:
    """The organisation's entries, newest first; ``since`` inclusive, ``before`` exclusive.
    Unsliced: the caller pages it."""
    entries = AuditLogEntry.objects.filter(tenant=tenant)
    if since is not None:
        entries = entries.filter(created_at__gte=since)
    if before is not None:
        entries = entries.filter(created_at__lt=before)
    return entries.select_related("actor").order_by("-created_at", "-id")
