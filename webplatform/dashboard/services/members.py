"""Members and invitations: invite by e-mail link, accept, change roles, remove.

Who may do what (the views check the actor's role before calling; these services enforce
the rules that hold whoever calls):

- only an owner grants, changes or removes the owner role; an admin manages admins and
  members;
- an organisation always keeps at least one owner: the last owner can be neither demoted
  nor removed. Owner rows are locked (``SELECT ... FOR UPDATE``) while this is checked, so
  two owners demoting each other at once cannot both succeed.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.mail import send_mail
from django.db import transaction
from django.utils import timezone
from django.utils.translation import gettext as _

from tenants.errors import ApplicationError
from tenants.models import AuditLogEntry, Invitation, Membership, Tenant
from tenants.services.audit_log import audit_log_record
from tenants.services.tenants import membership_create

INVITATION_DAYS = 7
ROLE_RANK = {Membership.Role.MEMBER: 0, Membership.Role.ADMIN: 1, Membership.Role.OWNER: 2}


def role_at_least(role: str, required: str) -> bool:
    return ROLE_RANK.get(role, -1) >= ROLE_RANK[required]


@dataclass(frozen=True, slots=True)
class CreatedInvitation:
    invitation: Invitation
    token: str  # only in the e-mailed link; the database keeps its hash


def invitation_token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _check_may_grant(*, actor_role: str, role: str) -> None:
    if role not in Membership.Role.values:
        raise ApplicationError(_("Unknown role."), code="invalid_value", param="role")
    if role == Membership.Role.OWNER and actor_role != Membership.Role.OWNER:
        raise ApplicationError(
            _("Only an owner can grant the owner role."),
            code="insufficient_permissions",
            status=403,
            param="role",
        )


@transaction.atomic
def invitation_create(
    *,
    tenant: Tenant,
    email: str,
    role: str,
    invited_by: AbstractBaseUser,
    actor_role: str,
    accept_url_for: Callable[[str], str],
) -> CreatedInvitation:
    """Invite ``email`` with ``role`` and e-mail the accept link (after commit).

    ``accept_url_for(token) -> str`` builds the absolute link (the view knows the host).
    """
    _check_may_grant(actor_role=actor_role, role=role)
    email = email.strip().lower()
    if Membership.objects.filter(tenant=tenant, user__email__iexact=email).exists():
        raise ApplicationError(
            _("This person is already a member."), code="already_member", param="email"
        )
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


@transaction.atomic
def invitation_accept(*, token: str, user: AbstractBaseUser) -> Membership:
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
    audit_log_record(
        tenant=invitation.tenant,
        actor=user,
        action=AuditLogEntry.Action.MEMBER_JOINED,
        target=user.get_username(),
        details={"role": role, "invited_email": invitation.email},
    )
    return membership


@transaction.atomic
def invitation_cancel(*, invitation: Invitation, actor: AbstractBaseUser) -> None:
    if invitation.accepted_at is not None or invitation.cancelled_at is not None:
        return
    Invitation.objects.filter(pk=invitation.pk).update(cancelled_at=timezone.now())
    audit_log_record(
        tenant=invitation.tenant,
        actor=actor,
        action=AuditLogEntry.Action.INVITATION_CANCELLED,
        target=invitation.email,
    )


def _lock_owners(tenant: Tenant) -> list[int]:
    return list(
        Membership.objects.select_for_update()
        .filter(tenant=tenant, role=Membership.Role.OWNER)
        .order_by("pk")
        .values_list("pk", flat=True)
    )


def _check_may_touch(*, membership: Membership, actor_role: str) -> None:
    if membership.role == Membership.Role.OWNER and actor_role != Membership.Role.OWNER:
        raise ApplicationError(
            _("Only an owner can change or remove an owner."),
            code="insufficient_permissions",
            status=403,
        )


@transaction.atomic
def membership_role_change(
    *, membership: Membership, role: str, actor: AbstractBaseUser, actor_role: str
) -> Membership:
    _check_may_grant(actor_role=actor_role, role=role)
    _check_may_touch(membership=membership, actor_role=actor_role)
    owners = _lock_owners(membership.tenant)
    membership.refresh_from_db(fields=["role"])
    if membership.role == role:
        return membership
    if membership.role == Membership.Role.OWNER and owners == [membership.pk]:
        raise ApplicationError(
            _("An organisation needs at least one owner: make someone else owner first."),
            code="last_owner",
            status=409,
        )
    previous = membership.role
    Membership.objects.filter(pk=membership.pk).update(role=role)
    membership.role = role
    audit_log_record(
        tenant=membership.tenant,
        actor=actor,
        action=AuditLogEntry.Action.ROLE_CHANGED,
        target=membership.user.get_username(),
        details={"from": previous, "to": role},
    )
    return membership


@transaction.atomic
def membership_remove(*, membership: Membership, actor: AbstractBaseUser, actor_role: str) -> None:
    _check_may_touch(membership=membership, actor_role=actor_role)
    owners = _lock_owners(membership.tenant)
    if membership.pk in owners and len(owners) == 1:
        raise ApplicationError(
            _("An organisation needs at least one owner: the last owner cannot be removed."),
            code="last_owner",
            status=409,
        )
    Membership.objects.filter(pk=membership.pk).delete()
    audit_log_record(
        tenant=membership.tenant,
        actor=actor,
        action=AuditLogEntry.Action.MEMBER_REMOVED,
        target=membership.user.get_username(),
        details={"role": membership.role},
    )
