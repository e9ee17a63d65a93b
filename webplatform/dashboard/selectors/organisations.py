"""Reads for the organisation pages: memberships, invitations, plans, audit log."""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import QuerySet
from django.utils import timezone

from tenants.errors import ApplicationError
from tenants.models import (
    AuditLogEntry,
    ContentLogEntry,
    ContentLoggingPolicy,
    Invitation,
    Membership,
    Plan,
    Tenant,
)

DEFAULT_RETENTION_DAYS = 30


def memberships_of_user(*, user: AbstractBaseUser) -> QuerySet[Membership]:
    return Membership.objects.filter(user=user).select_related("tenant").order_by("tenant__name")


def membership_get_for_tenant(*, tenant: Tenant, membership_id: int) -> Membership:
    membership = (
        Membership.objects.select_related("user", "tenant")
        .filter(tenant=tenant, pk=membership_id)
        .first()
    )
    if membership is None:
        raise ApplicationError("No such member.", code="not_found", status=404)
    return membership


def invitation_list_pending(*, tenant: Tenant) -> QuerySet[Invitation]:
    return (
        Invitation.objects.filter(
            tenant=tenant,
            accepted_at__isnull=True,
            cancelled_at__isnull=True,
            expires_at__gt=timezone.now(),
        )
        .select_related("invited_by", "tenant")
        .order_by("-created_at")
    )


def invitation_get_for_tenant(*, tenant: Tenant, invitation_id: int) -> Invitation:
    invitation = (
        Invitation.objects.select_related("tenant").filter(tenant=tenant, pk=invitation_id).first()
    )
    if invitation is None:
        raise ApplicationError("No such invitation.", code="not_found", status=404)
    return invitation


def plan_list() -> QuerySet[Plan]:
    return Plan.objects.order_by("requests_per_minute", "name")


def audit_log_for_tenant(*, tenant: Tenant, limit: int = 200) -> list[AuditLogEntry]:
    return list(
        AuditLogEntry.objects.filter(tenant=tenant)
        .select_related("actor")
        .order_by("-created_at", "-id")[:limit]
    )


def content_retention_days_get(*, tenant: Tenant) -> int:
    policy = ContentLoggingPolicy.objects.filter(tenant=tenant).first()
    return policy.retention_days if policy else DEFAULT_RETENTION_DAYS


def content_log_by_request(*, tenant: Tenant, request_ids: list[str]) -> dict[str, ContentLogEntry]:
    entries = ContentLogEntry.objects.filter(
        tenant=tenant, request_id__in=request_ids, expires_at__gt=timezone.now()
    )
    return {entry.request_id: entry for entry in entries}
