"""The audit log: one row per administrative action in an organisation."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import User

from tenants.models import AuditLogEntry, Tenant


def audit_log_record(
    *,
    tenant: Tenant,
    actor: User | None,
    action: str,
    target: str = "",
    details: dict[str, Any] | None = None,
) -> AuditLogEntry:
    """Record ``action``; call inside the transaction of the change it describes, so an
    action that rolls back leaves no entry."""
    if action not in AuditLogEntry.Action.values:
        raise ValueError(f"unknown audit action {action!r}")
    return AuditLogEntry.objects.create(
        tenant=tenant,
        actor=actor if actor is not None and actor.is_authenticated else None,
        action=action,
        target=target[:255],
        details=details or {},
    )
