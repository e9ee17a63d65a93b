"""Sign-up, log-in with lock-out, log-out, password reset, CSRF."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth import get_user_model
from django.core import mail
from django.test import Client
from django.urls import reverse

from tenants.models import AuditLogEntry, Membership

PASSWORD = "correct horse battery 42"


def _sign_up(client: Client, email: str = "ada@example.com", org: str = "Analytical") -> object:
    return client.post(
        reverse("dashboard:signup"),
        {"email": email, "organisation": org, "password1": PASSWORD, "password2": PASSWORD},
    )


@pytest.mark.django_db
def test_sign_up_creates_the_user_an_organisation_and_its_owner() -> None:
    client = Client()
    response = _sign_up(client)
    user = get_user_model().objects.get(email="ada@example.com")
    membership = Membership.objects.get(user=user)
    assert membership.role == Membership.Role.OWNER
    assert membership.tenant.name == "Analytical"
    assert membership.tenant.plan.name == "free"
    assert response.status_code == 302
    assert response["Location"] == reverse("dashboard:overview", args=[membership.tenant.pk])
    assert client.session["current_tenant_id"] == membership.tenant.pk
    assert client.get(response["Location"]).status_code == 200
    assert AuditLogEntry.objects.filter(
        tenant=membership.tenant, action=AuditLogEntry.Action.ORGANISATION_CREATED
    ).exists()


@pytest.mark.django_db
def test_sign_up_refuses_a_taken_email_weak_or_mismatched_passwords() -> None:
    _sign_up(Client())
    again = _sign_up(Client(), email="ADA@example.com")
    assert again.status_code == 200
    assert "already exists" in again.content.decode()
    weak = Client().post(
        reverse("dashboard:signup"),
        {"email": "b@example.com", "organisation": "B", "password1": "123", "password2": "123"},
    )
    assert weak.status_code == 200 and weak.context["form"].errors["password1"]
    mismatch = Client().post(
        reverse("dashboard:signup"),
        {"email": "c@example.com", "organisation": "C", "password1": PASSWORD, "password2": "x"},
    )
    assert mismatch.context["form"].errors["password2"]
    assert get_user_model().objects.count() == 1


@pytest.mark.django_db
def test_log_in_and_out() -> None:
    _sign_up(Client())
    client = Client()
    response = client.post(
        reverse("dashboard:login"), {"username": "ada@example.com", "password": PASSWORD}
    )
    assert response.status_code == 302 and response["Location"] == reverse("dashboard:home")
    assert client.get(reverse("dashboard:home")).status_code == 302
    # Log-out is POST only (a GET link could be forged by any page).
    assert client.get(reverse("dashboard:logout")).status_code == 405
    assert client.post(reverse("dashboard:logout")).status_code == 302
    # Logged out, / is the landing page again (issue 17), not the dashboard.
    assert client.get(reverse("dashboard:home")).templates[0].name == "landing.html"


@pytest.mark.django_db
def test_brute_force_locks_the_client_out_even_with_the_right_password(settings) -> None:
    settings.LOGIN_FAILURES_PER_USER = 5
    _sign_up(Client())
    client = Client()
    url = reverse("dashboard:login")
    for _ in range(5):
        wrong = client.post(url, {"username": "ada@example.com", "password": "wrong"})
        assert wrong.status_code == 200
    locked = client.post(url, {"username": "ada@example.com", "password": PASSWORD})
    assert locked.status_code == 429
    assert "Too many failed" in locked.content.decode()
    assert "_auth_user_id" not in client.session
    # Another account from the same address is not locked by this one's failures.
    _sign_up(Client(), email="bob@example.com", org="Bob")
    other = client.post(url, {"username": "bob@example.com", "password": PASSWORD})
    assert other.status_code == 302


@pytest.mark.django_db
def test_a_successful_log_in_resets_the_failure_count(settings) -> None:
    settings.LOGIN_FAILURES_PER_USER = 3
    _sign_up(Client())
    client = Client()
    url = reverse("dashboard:login")
    for _ in range(2):
        client.post(url, {"username": "ada@example.com", "password": "wrong"})
    assert (
        client.post(url, {"username": "ada@example.com", "password": PASSWORD}).status_code == 302
    )
    client.post(reverse("dashboard:logout"))
    for _ in range(2):
        client.post(url, {"username": "ada@example.com", "password": "wrong"})
    assert (
        client.post(url, {"username": "ada@example.com", "password": PASSWORD}).status_code == 302
    )


@pytest.mark.django_db
def test_password_reset_by_email_link() -> None:
    _sign_up(Client())
    client = Client()
    response = client.post(reverse("dashboard:password-reset"), {"email": "ada@example.com"})
    assert response["Location"] == reverse("dashboard:password-reset-done")
    assert len(mail.outbox) == 1
    link = re.search(r"http://testserver(/accounts/reset/\S+)", mail.outbox[0].body).group(1)
    form_page = client.get(link, follow=True)
    assert form_page.status_code == 200 and form_page.context["validlink"]
    new_password = "another long passphrase 7"
    done = client.post(
        form_page.redirect_chain[-1][0],
        {"new_password1": new_password, "new_password2": new_password},
    )
    assert done["Location"] == reverse("dashboard:password-reset-complete")
    assert Client().login(username="ada@example.com", password=new_password)


@pytest.mark.django_db
def test_password_reset_for_an_unknown_address_says_the_same_and_sends_nothing() -> None:
    response = Client().post(reverse("dashboard:password-reset"), {"email": "nobody@example.com"})
    assert response["Location"] == reverse("dashboard:password-reset-done")
    assert mail.outbox == []


@pytest.mark.django_db
def test_forms_without_a_csrf_token_are_refused(client_for, owner) -> None:
    client = Client(enforce_csrf_checks=True)
    response = client.post(reverse("dashboard:login"), {"username": "a", "password": "b"})
    assert response.status_code == 403
    owner.user.refresh_from_db()
    client.force_login(owner.user)
    response = client.post(reverse("dashboard:keys", args=[owner.tenant.pk]), {"name": "k"})
    assert response.status_code == 403
    assert not owner.tenant.api_keys.exists()
