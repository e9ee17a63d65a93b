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
