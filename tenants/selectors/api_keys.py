"""API key reads; tenant-scoped except the operator's lookup by public id."""

from __future__ import annotations

from django.db.models import QuerySet

from tenants.errors import ApplicationError
from tenants.models import ApiKey, Tenant


def api_key_list_for_tenant(*, tenant: Tenant, include_revoked: bool = True) -> QuerySet[ApiKey]:
    keys = ApiKey.objects.filter(tenant=tenant).select_related("created_by")
    if not include_revoked:
        keys = keys.filter(revoked_at__isnull=True)
    return keys.order_by("-created_at")


def api_key_get_for_tenant(*, tenant: Tenant, public_id: str) -> ApiKey:
    """One of the tenant's keys; another tenant's key is reported as missing (404)."""
    api_key = ApiKey.objects.filter(tenant=tenant, public_id=public_id).first()
    if api_key is None:
        raise ApplicationError(
            f"No API key {public_id!r} in this organisation.", code="not_found", status=404
        )
    return api_key


def api_key_get_for_operator(*, public_id: str) -> ApiKey:
    """Any tenant's key by public id: for operators (management commands, admin) only."""
    api_key = ApiKey.objects.select_related("tenant").filter(public_id=public_id).first()
    if api_key is None:
        raise ApplicationError(f"No API key {public_id!r}.", code="not_found", status=404)
    return api_key
