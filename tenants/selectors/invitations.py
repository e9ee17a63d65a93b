"""Invitation reads: an organisation's pending invitations, one by id, one by its token."""

from __future__ import annotations

import hashlib

from django.db.models import QuerySet
from django.utils import timezone
from django.utils.translation import gettext as _

from tenants.errors import ApplicationError
from tenants.models import Invitation, Tenant


def invitation_token_hash(token: str) -> str:
    """What the database keeps of an invitation's token (the token is only in the e-mail)."""
    return hashlib.sha256(token.encode()).hexdigest()


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


def invitation_get_by_token(*, token: str) -> Invitation:
    """A pending invitation by its token; 404 ``invitation_not_found`` if unknown, used,
    cancelled or expired (all told apart in the message, not in the status)."""
    invitation = (
        Invitation.objects.select_related("tenant")
        .filter(token_hash=invitation_token_hash(token))
        .first()
    )
    if invitation is None or invitation.cancelled_at is not None:
        raise ApplicationError(
            _("This invitation does not exist or was cancelled."),
            code="invitation_not_found",
            status=404,
        )
    if invitation.accepted_at is not None:
        raise ApplicationError(
            _("This invitation has already been accepted."),
            code="invitation_not_found",
            status=404,
        )
    if invitation.expires_at <= timezone.now():
        raise ApplicationError(
            _("This invitation has expired. Ask for a new one."),
            code="invitation_not_found",
            status=404,
        )
    return invitation
