"""Roles: who may grant and change which, and the organisation's last owner."""

from __future__ import annotations

import pytest

from tenants.errors import ApplicationError
from tenants.models import AuditLogEntry, Membership
from tenants.services.members import membership_remove, membership_role_change, role_at_least

pytestmark = pytest.mark.django_db

OWNER, ADMIN, MEMBER = Membership.Role.OWNER, Membership.Role.ADMIN, Membership.Role.MEMBER


def _refused(call, **kwargs) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(ApplicationError) as refused:
        call(**kwargs)
    return refused.value.status, refused.value.code


def test_roles_rank_owner_over_admin_over_member() -> None:
    assert role_at_least(OWNER, ADMIN) and role_at_least(ADMIN, ADMIN)
    assert not role_at_least(MEMBER, ADMIN)
    assert not role_at_least("stranger", MEMBER)


def test_an_admin_neither_grants_nor_touches_the_owner_role(owner, teammate):
    admin = dict(actor=teammate.user, actor_role=ADMIN)

    assert _refused(
        membership_role_change, membership=teammate.membership, role=OWNER, **admin
    ) == (403, "insufficient_permissions")
    assert _refused(membership_role_change, membership=owner.membership, role=MEMBER, **admin) == (
        403,
        "insufficient_permissions",
    )
    assert _refused(membership_remove, membership=owner.membership, **admin) == (
        403,
        "insufficient_permissions",
    )
    assert Membership.objects.get(pk=owner.membership.pk).role == OWNER

    membership_role_change(membership=teammate.membership, role=ADMIN, **admin)
    assert Membership.objects.get(pk=teammate.membership.pk).role == ADMIN


def test_the_last_owner_stays_until_there_is_another(owner, teammate):
    me = dict(actor=owner.user, actor_role=OWNER)

    assert _refused(membership_role_change, membership=owner.membership, role=ADMIN, **me) == (
        409,
        "last_owner",
    )
    assert _refused(membership_remove, membership=owner.membership, **me) == (409, "last_owner")

    membership_role_change(membership=teammate.membership, role=OWNER, **me)
    membership_role_change(membership=owner.membership, role=ADMIN, **me)
    assert Membership.objects.get(pk=owner.membership.pk).role == ADMIN


def test_an_unknown_role_is_refused(owner, teammate):
    assert _refused(
        membership_role_change,
        membership=teammate.membership,
        role="emperor",
        actor=owner.user,
        actor_role=OWNER,
    ) == (400, "invalid_value")


def test_changes_and_removals_are_audited(owner, teammate):
    membership_role_change(
        membership=teammate.membership, role=ADMIN, actor=owner.user, actor_role=OWNER
    )
    membership_remove(membership=teammate.membership, actor=owner.user, actor_role=OWNER)

    assert not Membership.objects.filter(pk=teammate.membership.pk).exists()
    entries = AuditLogEntry.objects.filter(tenant=owner.tenant).order_by("id")
    assert [(e.action, e.details) for e in entries] == [
        ("role_changed", {"from": MEMBER, "to": ADMIN}),
        ("member_removed", {"role": ADMIN}),
    ]
