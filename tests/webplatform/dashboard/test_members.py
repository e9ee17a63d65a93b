"""Invitations, roles and removal; the last owner stays."""

from __future__ import annotations

import re

import pytest
from django.core import mail
from django.test import Client
from django.urls import reverse

from tenants.models import AuditLogEntry, Invitation, Membership
from tests.factories import UserFactory


def _invite(client: Client, tenant_id: int, email: str, role: str) -> object:
    return client.post(
        reverse("dashboard:members", args=[tenant_id]), {"email": email, "role": role}
    )


def _accept_link() -> str:
    return re.search(r"http://testserver(/invitations/\S+/)", mail.outbox[-1].body).group(1)


def _user(email: str) -> object:
    user = UserFactory(username=email, email=email)
    user.save()
    return user


@pytest.mark.django_db
def test_invite_by_email_then_accept_with_the_link(
    client_for, owner, django_capture_on_commit_callbacks
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        response = _invite(client_for(owner), owner.tenant.pk, "grace@example.com", "admin")
    assert response.status_code == 302
    assert mail.outbox[-1].to == ["grace@example.com"]
    link = _accept_link()
    # The token is in the link only; the database keeps its hash.
    token = link.rstrip("/").rsplit("/", 1)[-1]
    assert not Invitation.objects.filter(token_hash=token).exists()

    anonymous = Client().get(link)
    assert anonymous.status_code == 200 and "Acme" in anonymous.content.decode()
    grace = _user("grace@example.com")
    client = Client()
    client.force_login(grace)
    accepted = client.post(link)
    assert accepted["Location"] == reverse("dashboard:overview", args=[owner.tenant.pk])
    assert Membership.objects.get(tenant=owner.tenant, user=grace).role == "admin"
    # Used once only.
    assert client.post(link).status_code == 404
    actions = set(
        AuditLogEntry.objects.filter(tenant=owner.tenant).values_list("action", flat=True)
    )
    assert {"member_invited", "member_joined"} <= actions


@pytest.mark.django_db
def test_an_invitation_cannot_be_accepted_by_another_account(
    client_for, owner, outsider, django_capture_on_commit_callbacks
) -> None:
    """A forwarded or leaked link does not make a stranger a member: the signed-in
    account's e-mail must be the invited one."""
    with django_capture_on_commit_callbacks(execute=True):
        _invite(client_for(owner), owner.tenant.pk, "grace@example.com", "admin")
    link = _accept_link()
    stranger = client_for(outsider)
    refused = stranger.post(link)
    assert refused.status_code == 403
    assert "another e-mail address" in refused.content.decode()
    assert not Membership.objects.filter(tenant=owner.tenant, user=outsider.user).exists()
    assert Invitation.objects.get(tenant=owner.tenant).accepted_at is None
    # The invited person can still use it (case of the address does not matter).
    grace = _user("Grace@Example.com")
    client = Client()
    client.force_login(grace)
    assert client.post(link).status_code == 302
    assert Membership.objects.get(tenant=owner.tenant, user=grace).role == "admin"


@pytest.mark.django_db
def test_an_unknown_or_cancelled_invitation_is_404(
    client_for, owner, django_capture_on_commit_callbacks
) -> None:
    assert Client().get("/invitations/not-a-token/").status_code == 404
    with django_capture_on_commit_callbacks(execute=True):
        _invite(client_for(owner), owner.tenant.pk, "x@example.com", "member")
    link = _accept_link()
    invitation = Invitation.objects.get(tenant=owner.tenant)
    cancel = reverse("dashboard:invitation-cancel", args=[owner.tenant.pk, invitation.pk])
    assert client_for(owner).post(cancel).status_code == 302
    assert Client().get(link).status_code == 404


@pytest.mark.django_db
def test_an_admin_cannot_grant_or_touch_the_owner_role(
    client_for, owner, org_admin, teammate
) -> None:
    client = client_for(org_admin)
    response = _invite(client, owner.tenant.pk, "boss@example.com", "owner")
    assert response.status_code == 400
    assert not Invitation.objects.exists()
    role_url = reverse("dashboard:member-role", args=[owner.tenant.pk, teammate.membership.pk])
    client.post(role_url, {"role": "owner"})
    assert Membership.objects.get(pk=teammate.membership.pk).role == "member"
    client.post(
        reverse("dashboard:member-role", args=[owner.tenant.pk, owner.membership.pk]),
        {"role": "member"},
    )
    client.post(reverse("dashboard:member-remove", args=[owner.tenant.pk, owner.membership.pk]))
    assert Membership.objects.get(pk=owner.membership.pk).role == "owner"
    # But an admin does manage members.
    client.post(role_url, {"role": "admin"})
    assert Membership.objects.get(pk=teammate.membership.pk).role == "admin"


@pytest.mark.django_db
def test_the_last_owner_can_be_neither_demoted_nor_removed(client_for, owner, teammate) -> None:
    client = client_for(owner)
    own = owner.membership.pk
    response = client.post(
        reverse("dashboard:member-role", args=[owner.tenant.pk, own]),
        {"role": "admin"},
        follow=True,
    )
    assert "at least one owner" in response.content.decode()
    client.post(reverse("dashboard:member-remove", args=[owner.tenant.pk, own]))
    assert Membership.objects.get(pk=own).role == "owner"
    # With a second owner, the first may step down.
    client.post(
        reverse("dashboard:member-role", args=[owner.tenant.pk, teammate.membership.pk]),
        {"role": "owner"},
    )
    client.post(reverse("dashboard:member-role", args=[owner.tenant.pk, own]), {"role": "admin"})
    assert Membership.objects.get(pk=own).role == "admin"


@pytest.mark.django_db
def test_remove_a_member_after_confirmation(client_for, owner, teammate) -> None:
    client = client_for(owner)
    url = reverse("dashboard:member-remove", args=[owner.tenant.pk, teammate.membership.pk])
    assert client.get(url).status_code == 200  # the confirmation page
    assert Membership.objects.filter(pk=teammate.membership.pk).exists()
    assert client.post(url).status_code == 302
    assert not Membership.objects.filter(pk=teammate.membership.pk).exists()
    assert (
        client_for(teammate).get(reverse("dashboard:overview", args=[owner.tenant.pk])).status_code
        == 404
    )
    entry = AuditLogEntry.objects.get(tenant=owner.tenant, action="member_removed")
    assert entry.target == teammate.user.get_username() and entry.actor == owner.user


@pytest.mark.django_db
def test_another_organisations_member_id_is_404(client_for, owner, outsider) -> None:
    url = reverse("dashboard:member-remove", args=[owner.tenant.pk, outsider.membership.pk])
    assert client_for(owner).post(url).status_code == 404
    assert Membership.objects.filter(pk=outsider.membership.pk).exists()


@pytest.mark.django_db
def test_switch_between_organisations(client_for, owner, outsider) -> None:
    Membership.objects.create(user=owner.user, tenant=outsider.tenant, role="member")
    client = client_for(owner)
    response = client.post(reverse("dashboard:org-switch"), {"tenant_id": outsider.tenant.pk})
    assert response["Location"] == reverse("dashboard:overview", args=[outsider.tenant.pk])
    assert client.session["current_tenant_id"] == outsider.tenant.pk
    assert client.get("/")["Location"] == reverse("dashboard:overview", args=[outsider.tenant.pk])
    stranger = client_for(owner)
    Membership.objects.filter(user=owner.user, tenant=outsider.tenant).delete()
    assert (
        stranger.post(
            reverse("dashboard:org-switch"), {"tenant_id": outsider.tenant.pk}
        ).status_code
        == 404
    )


@pytest.mark.django_db
def test_create_a_second_organisation(client_for, owner) -> None:
    client = client_for(owner)
    response = client.post(reverse("dashboard:org-create"), {"name": "Side project"})
    membership = Membership.objects.get(user=owner.user, tenant__name="Side project")
    assert membership.role == "owner"
    assert response["Location"] == reverse("dashboard:overview", args=[membership.tenant_id])
