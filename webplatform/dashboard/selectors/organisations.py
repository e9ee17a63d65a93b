"""Reads for the organisation pages: memberships, invitations, plans."""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import QuerySet
from django.utils import timezone

from tenants.errors import ApplicationError
from tenants.models import Invitation, Membership, Plan, Tenant


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
