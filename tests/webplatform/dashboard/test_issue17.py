"""Dashboard fixes of issue 17 checked through Django's test client (where a browser adds
nothing); the browser journeys are in ``test_journeys``."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from tenants.services.invitations import invitation_create

PASSWORD = "correct horse battery 42"


def invite(persona, email: str, role: str = "member") -> str:
    created = invitation_create(
        tenant=persona.tenant,
        email=email,
        role=role,
        invited_by=persona.user,
        actor_role="owner",
        accept_url_for=lambda token: f"/invitations/{token}/",
    )
    return created.token


@pytest.mark.django_db
def test_an_invited_sign_up_with_another_address_creates_nothing(owner) -> None:
    token = invite(owner, "grace@example.com")
    response = Client().post(
        reverse("dashboard:signup"),
        {
            "invitation": token,
            "email": "mallory@example.com",
            "password1": PASSWORD,
            "password2": PASSWORD,
        },
    )
    assert response.status_code == 200
    assert "another e-mail address" in response.content.decode()
    assert not User.objects.filter(email="mallory@example.com").exists()


@pytest.mark.django_db
def test_a_new_invitation_supersedes_the_old_and_accepting_clears_the_address(
    owner, client_for
) -> None:
    from tenants.models import Invitation
    from tenants.selectors.invitations import invitation_list_pending

    first = invite(owner, "grace@example.com")
    second = invite(owner, "Grace@example.com", role="admin")
    # Only the newest invitation is pending; the first link is void.
    assert [i.role for i in invitation_list_pending(tenant=owner.tenant)] == ["admin"]
    assert Client().get(f"/invitations/{first}/").status_code == 404

    grace = User.objects.create_user("grace@example.com", "grace@example.com", PASSWORD)
    # An older invitation that was never superseded (made before this rule) is voided too.
    third = invite(owner, "other@example.com")
    Invitation.objects.filter(email="other@example.com").update(email="grace@example.com")
    client = Client()
    client.force_login(grace)
    assert client.post(f"/invitations/{second}/").status_code == 302
    assert list(invitation_list_pending(tenant=owner.tenant)) == []
    members_page = client_for(owner).get(reverse("dashboard:members", args=[owner.tenant.pk]))
    assert "Pending invitations" not in members_page.content.decode()
    assert Client().get(f"/invitations/{third}/").status_code == 404
