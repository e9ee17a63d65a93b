"""API keys page: create (shown once), list redacted, revoke with confirmation."""

from __future__ import annotations

import pytest
from django.urls import reverse

from tenants.models import ApiKey, AuditLogEntry
from tests.factories import api_key_for


@pytest.mark.django_db
def test_create_a_key_and_see_it_exactly_once(client_for, org_admin, api_client_for) -> None:
    client = client_for(org_admin)
    url = reverse("dashboard:keys", args=[org_admin.tenant.pk])
    response = client.post(
        url,
        {"name": "CI", "models": ["glm-4.6v-flash"], "access": "read", "expires_in_days": "30"},
    )
    # Post/redirect/get: the secret is shown on the page the redirect leads to, once.
    assert response.status_code == 302 and response["Location"] == url
    shown = client.get(url)
    assert shown["Cache-Control"] == "no-store"
    raw_key = shown.context["created"]["raw_key"]
    assert raw_key in shown.content.decode()
    key = ApiKey.objects.get(tenant=org_admin.tenant)
    assert (key.name, key.access, key.allowed_models) == ("CI", "read", ["glm-4.6v-flash"])
    assert key.created_by == org_admin.user and key.expires_at is not None
    # The key works against the API...
    assert api_client_for(raw_key).get("/v1/models").status_code == 200
    # ...and the list shows it redacted, never whole.
    listing = client.get(url).content.decode()
    assert raw_key not in listing
    assert f"sk_{key.public_id}_…" in listing
    assert AuditLogEntry.objects.filter(action="key_created", target=key.public_id).exists()


@pytest.mark.django_db
def test_a_key_needs_a_name(client_for, owner) -> None:
    response = client_for(owner).post(
        reverse("dashboard:keys", args=[owner.tenant.pk]), {"access": "full"}
    )
    assert response.status_code == 400
    assert not ApiKey.objects.exists()


@pytest.mark.django_db
def test_revoke_after_confirmation_refuses_the_key(client_for, owner, api_client_for) -> None:
    created = api_key_for(owner.tenant)
    client = client_for(owner)
    url = reverse("dashboard:key-revoke", args=[owner.tenant.pk, created.api_key.public_id])
    assert client.get(url).status_code == 200  # the confirmation; nothing revoked yet
    assert api_client_for(created.raw_key).get("/v1/models").status_code == 200
    response = client.post(url)
    assert response["Location"] == reverse("dashboard:keys", args=[owner.tenant.pk])
    refused = api_client_for(created.raw_key).get("/v1/models")
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "api_key_revoked"
    assert AuditLogEntry.objects.filter(action="key_revoked", actor=owner.user).count() == 1


@pytest.mark.django_db
def test_another_organisations_key_cannot_be_revoked(client_for, owner, outsider) -> None:
    theirs = api_key_for(outsider.tenant).api_key
    url = reverse("dashboard:key-revoke", args=[owner.tenant.pk, theirs.public_id])
    assert client_for(owner).post(url).status_code == 404
    theirs.refresh_from_db()
    assert theirs.revoked_at is None


@pytest.mark.django_db
def test_reloading_after_creating_a_key_creates_no_second_key(client_for, owner) -> None:
    """A reload of the page after a create repeats a GET, not the POST (post/redirect/get)."""
    client = client_for(owner)
    url = reverse("dashboard:keys", args=[owner.tenant.pk])
    response = client.post(url, {"name": "once", "access": "full"}, follow=True)
    raw_key = response.context["created"]["raw_key"]
    assert response.redirect_chain == [(url, 302)]
    reloaded = client.get(url)
    assert ApiKey.objects.filter(tenant=owner.tenant).count() == 1
    assert reloaded.context["created"] is None
    assert raw_key not in reloaded.content.decode()
