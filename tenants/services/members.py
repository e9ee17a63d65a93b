"""Members: roles and the rules on them, change a role, remove a member.

Who may do what (the views check the actor's role before calling; these services enforce
the rules that hold whoever calls):

- only an owner grants, changes or removes the owner role; an admin manages admins and
  members;
- an organisation always keeps at least one owner: the last owner can be neither demoted
  nor removed. Owner rows are locked (``SELECT ... FOR UPDATE``) while this is checked, so
  two owners demoting each other at once cannot both succeed.

Invitations (``tenants.services.invitations``) follow the same rules for the role they offer.
"""

from __future__ import annotations

from django.contrib.auth.models import User
from django.db import transaction
from django.utils.translation import gettext as _

from tenants.errors import ApplicationError
from tenants.models import AuditLogEntry, Membership, Tenant
from tenants.services.audit_log import audit_log_record

# Keyed by str: a role read from a form or a row is a plain str, equal to its Role member.
ROLE_RANK: dict[str, int] = {
    Membership.Role.MEMBER: 0,
    Membership.Role.ADMIN: 1,
    Membership.Role.OWNER: 2,
}


def role_at_least(role: str, required: str) -> bool:
    return ROLE_RANK.get(role, -1) >= ROLE_RANK[required]


def role_grant_check(*, actor_role: str, role: str) -> None:
    """Refuse an unknown role, and the owner role to an actor who is not an owner."""
    if role not in Membership.Role.values:
        raise ApplicationError(_("Unknown role."), code="invalid_value", param="role")
    if role == Membership.Role.OWNER and actor_role != Membership.Role.OWNER:
        raise ApplicationError(
            _("Only an owner can grant the owner role."),
            code="insufficient_permissions",
            status=403,
            param="role",
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
    *, membership: Membership, role: str, actor: User, actor_role: str
) -> Membership:
    role_grant_check(actor_role=actor_role, role=role)
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
def membership_remove(*, membership: Membership, actor: User, actor_role: str) -> None:
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
