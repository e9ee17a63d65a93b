"""Invitations: the e-mailed link, who may accept it, once."""

from __future__ import annotations

import pytest
from django.core import mail

from tenants.errors import ApplicationError
from tenants.models import Invitation, Membership
from tenants.selectors.invitations import invitation_get_by_token, invitation_list_pending
from tenants.services.invitations import (
    CreatedInvitation,
    invitation_accept,
    invitation_cancel,
    invitation_create,
)
from tests.factories import MembershipFactory, UserFactory

pytestmark = pytest.mark.django_db


def _invite(persona, email: str, role: str = "member", actor_role: str = "owner"):  # type: ignore[no-untyped-def]
    return invitation_create(
        tenant=persona.tenant,
        email=email,
        role=role,
        invited_by=persona.user,
        actor_role=actor_role,
        accept_url_for=lambda token: f"https://example.test/invitations/{token}/",
    )


def _refused_code(call, **kwargs) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(ApplicationError) as refused:
        call(**kwargs)
    return refused.value.status, refused.value.code


def test_the_link_is_mailed_after_commit_and_only_its_hash_is_kept(
    owner, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        created = _invite(owner, " Grace@Example.com ")
    assert mail.outbox == []
    for callback in callbacks:
        callback()

    assert mail.outbox[-1].to == ["grace@example.com"]
    assert f"/invitations/{created.token}/" in mail.outbox[-1].body
    assert not Invitation.objects.filter(token_hash=created.token).exists()
    assert invitation_get_by_token(token=created.token).pk == created.invitation.pk
    assert list(invitation_list_pending(tenant=owner.tenant)) == [created.invitation]


def test_only_an_owner_invites_an_owner_and_members_are_not_invited(owner, teammate):
    assert _refused_code(
        _invite, persona=owner, email="boss@example.com", role="owner", actor_role="admin"
    ) == (403, "insufficient_permissions")
    assert _refused_code(_invite, persona=owner, email=teammate.user.email) == (
        400,
        "already_member",
    )
    assert not Invitation.objects.exists()


def test_only_the_invited_address_accepts_once(owner, outsider):
    created: CreatedInvitation = _invite(owner, "grace@example.com", role="admin")

    assert _refused_code(invitation_accept, token=created.token, user=outsider.user) == (
        403,
        "invitation_email_mismatch",
    )
    grace = UserFactory(username="grace", email="GRACE@example.com")
    membership = invitation_accept(token=created.token, user=grace)

    assert (membership.tenant_id, membership.role) == (owner.tenant.pk, "admin")
    assert _refused_code(invitation_accept, token=created.token, user=grace) == (
        404,
        "invitation_not_found",
    )


def test_accepting_never_lowers_a_role_held_meanwhile(owner):
    created = _invite(owner, "grace@example.com", role="member")
    grace = UserFactory(username="grace", email="grace@example.com")
    MembershipFactory(tenant=owner.tenant, user=grace, role="admin")

    assert invitation_accept(token=created.token, user=grace).role == "admin"
    assert Membership.objects.get(tenant=owner.tenant, user=grace).role == "admin"


def test_a_cancelled_invitation_is_gone(owner):
    created = _invite(owner, "grace@example.com")
    invitation_cancel(invitation=created.invitation, actor=owner.user)

    assert _refused_code(invitation_get_by_token, token=created.token) == (
        404,
        "invitation_not_found",
    )
    assert list(invitation_list_pending(tenant=owner.tenant)) == []
