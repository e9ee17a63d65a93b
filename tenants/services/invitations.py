"""Invitations: invite by e-mail link, accept, cancel.

Who may invite whom follows the role rules of ``tenants.services.members``: only an owner
invites an owner.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.contrib.auth.models import User
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone
from django.utils.translation import gettext as _

from tenants.errors import ApplicationError
from tenants.models import AuditLogEntry, Invitation, Membership, Tenant
from tenants.selectors.invitations import invitation_get_by_token, invitation_token_hash
from tenants.services.audit_log import audit_log_record
from tenants.services.members import role_at_least, role_grant_check
from tenants.services.tenants import membership_create

INVITATION_DAYS = 7


@dataclass(frozen=True, slots=True)
class CreatedInvitation:
    invitation: Invitation
    token: str  # only in the e-mailed link; the database keeps its hash


def _pending_for(*, tenant: Tenant, email: str) -> QuerySet[Invitation]:
    return Invitation.objects.filter(
        tenant=tenant,
        email__iexact=email.strip(),
        accepted_at__isnull=True,
        cancelled_at__isnull=True,
    )


@transaction.atomic
def invitation_create(
    *,
    tenant: Tenant,
    email: str,
    role: str,
    invited_by: User,
    actor_role: str,
    accept_url_for: Callable[[str], str],
) -> CreatedInvitation:
    """Invite ``email`` with ``role`` and e-mail the accept link (after commit).

    ``accept_url_for(token) -> str`` builds the absolute link (the view knows the host).
    """
    role_grant_check(actor_role=actor_role, role=role)
    email = email.strip().lower()
    if Membership.objects.filter(tenant=tenant, user__email__iexact=email).exists():
        raise ApplicationError(
            _("This person is already a member."), code="already_member", param="email"
        )
    # A new invitation supersedes the pending ones to the same address: only the newest
    # link works, and the page lists the address once.
    _pending_for(tenant=tenant, email=email).update(cancelled_at=timezone.now())
    token = secrets.token_urlsafe(32)
    invitation = Invitation.objects.create(
        tenant=tenant,
        email=email,
        role=role,
        token_hash=invitation_token_hash(token),
        invited_by=invited_by,
        expires_at=timezone.now() + timedelta(days=INVITATION_DAYS),
    )
    audit_log_record(
        tenant=tenant,
        actor=invited_by,
        action=AuditLogEntry.Action.MEMBER_INVITED,
        target=email,
        details={"role": role},
    )
    link = accept_url_for(token)
    subject = _("You are invited to %(organisation)s") % {"organisation": tenant.name}
    body = _(
        "%(inviter)s invited you to join %(organisation)s as %(role)s.\n\n"
        "Accept the invitation (valid for %(days)s days):\n%(link)s\n"
    ) % {
        "inviter": invited_by.get_username(),
        "organisation": tenant.name,
        "role": Membership.Role(role).label,
        "days": INVITATION_DAYS,
        "link": link,
    }
    transaction.on_commit(
        lambda: send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, [email], fail_silently=True)
    )
    return CreatedInvitation(invitation=invitation, token=token)


@transaction.atomic
def invitation_accept(*, token: str, user: User) -> Membership:
    """Join the inviting organisation as ``user``. An existing member keeps the higher of
    the two roles.

    The link alone is not enough: the signed-in account's e-mail address must be the one
    invited (403 ``invitation_email_mismatch``), so a forwarded or leaked link cannot make a
    stranger a member. The invitation row is locked before it is checked, so two accepts of
    one link cannot both succeed.
    """
    # Lock first, then check: a second accept waits here and then sees ``accepted_at``.
    list(Invitation.objects.select_for_update().filter(token_hash=invitation_token_hash(token)))
    invitation = invitation_get_by_token(token=token)
    user_email = (getattr(user, "email", "") or "").strip().lower()
    if not user_email or user_email != invitation.email.strip().lower():
        raise ApplicationError(
            _(
                "This invitation is for another e-mail address. Log in with the invited "
                "address to accept it."
            ),
            code="invitation_email_mismatch",
            status=403,
        )
    existing = Membership.objects.filter(tenant=invitation.tenant, user=user).first()
    role = invitation.role
    if existing is not None and role_at_least(existing.role, role):
        role = existing.role
    membership = membership_create(tenant=invitation.tenant, user=user, role=role)
    Invitation.objects.filter(pk=invitation.pk).update(accepted_at=timezone.now(), accepted_by=user)
    # Any other link to the same address is void now: they are a member.
    _pending_for(tenant=invitation.tenant, email=invitation.email).exclude(pk=invitation.pk).update(
        cancelled_at=timezone.now()
    )
    audit_log_record(
        tenant=invitation.tenant,
        actor=user,
        action=AuditLogEntry.Action.MEMBER_JOINED,
        target=user.get_username(),
        details={"role": role, "invited_email": invitation.email},
    )
    return membership


@transaction.atomic
def invitation_cancel(*, invitation: Invitation, actor: User) -> None:
    if invitation.accepted_at is not None or invitation.cancelled_at is not None:
        return
    Invitation.objects.filter(pk=invitation.pk).update(cancelled_at=timezone.now())
    audit_log_record(
        tenant=invitation.tenant,
        actor=actor,
        action=AuditLogEntry.Action.INVITATION_CANCELLED,
        target=invitation.email,
    )
