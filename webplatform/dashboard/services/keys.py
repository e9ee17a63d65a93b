"""API keys from the dashboard: ``tenants.services.api_keys`` plus an audit entry."""

from __future__ import annotations

from datetime import datetime

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction

from tenants.models import ApiKey, AuditLogEntry, Tenant
from tenants.services.api_keys import CreatedApiKey, api_key_create, api_key_revoke
from tenants.services.audit_log import audit_log_record


@transaction.atomic
def dashboard_api_key_create(
    *,
    tenant: Tenant,
    name: str,
    created_by: AbstractBaseUser,
    allowed_models: list[str],
    access: str,
    expires_at: datetime | None,
) -> CreatedApiKey:
    created = api_key_create(
        tenant=tenant,
        name=name,
        created_by=created_by,
        allowed_models=allowed_models,
        access=access,
        expires_at=expires_at,
    )
    audit_log_record(
        tenant=tenant,
        actor=created_by,
        action=AuditLogEntry.Action.KEY_CREATED,
        target=created.api_key.public_id,
        details={
            "name": created.api_key.name,
            "access": access,
            "models": list(allowed_models),
            "expires_at": expires_at.isoformat() if expires_at else None,
        },
    )
    return created


@transaction.atomic
def dashboard_api_key_revoke(*, api_key: ApiKey, actor: AbstractBaseUser) -> ApiKey:
    already = api_key.revoked_at is not None
    api_key_revoke(api_key=api_key)
    if not already:
        audit_log_record(
            tenant=api_key.tenant,
            actor=actor,
            action=AuditLogEntry.Action.KEY_REVOKED,
            target=api_key.public_id,
            details={"name": api_key.name},
        )
    return api_key
