"""Audit log reads: an organisation's administrative actions, newest first."""

from __future__ import annotations

from tenants.models import AuditLogEntry, Tenant


def audit_log_for_tenant(*, tenant: Tenant, limit: int = 200) -> list[AuditLogEntry]:
    return list(
        AuditLogEntry.objects.filter(tenant=tenant)
        .select_related("actor")
        .order_by("-created_at", "-id")[:limit]
    )
