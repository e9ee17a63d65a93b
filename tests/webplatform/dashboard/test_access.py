"""Who may open which page: every organisation page for every role, anonymous visitors,
outsiders (404, never 200) and an organisation that does not exist."""

from __future__ import annotations

import pytest
from django.urls import reverse

from tests.factories import api_key_for

# (url name, lowest role that may open it with GET)
ORG_PAGES = [
    ("dashboard:overview", "member"),
    ("dashboard:playground", "member"),
    ("dashboard:usage", "member"),
    ("dashboard:usage-csv", "member"),
    ("dashboard:requests", "member"),
    ("dashboard:audit", "admin"),
    ("dashboard:keys", "admin"),
    ("dashboard:members", "admin"),
    ("dashboard:settings", "admin"),
    ("dashboard:org-delete", "owner"),
]
RANK = {"member": 0, "admin": 1, "owner": 2}


def _personas(request: pytest.FixtureRequest) -> dict[str, object]:
    return {
        "owner": request.getfixturevalue("owner"),
        "admin": request.getfixturevalue("org_admin"),
        "member": request.getfixturevalue("teammate"),
    }


@pytest.mark.django_db
@pytest.mark.parametrize(("name", "required"), ORG_PAGES)
@pytest.mark.parametrize("role", ["owner", "admin", "member"])
def test_each_role_opens_exactly_the_pages_its_role_allows(
    request, client_for, name, required, role
) -> None:
    persona = _personas(request)[role]
    response = client_for(persona).get(reverse(name, args=[persona.tenant.pk]))
    expected = 200 if RANK[role] >= RANK[required] else 403
    assert response.status_code == expected


@pytest.mark.django_db
@pytest.mark.parametrize(("name", "required"), ORG_PAGES)
def test_an_outsider_gets_404_for_every_page_of_another_organisation(
    client_for, owner, outsider, name, required
) -> None:
    response = client_for(outsider).get(reverse(name, args=[owner.tenant.pk]))
    assert response.status_code == 404


@pytest.mark.django_db
@pytest.mark.parametrize(("name", "required"), ORG_PAGES)
def test_anonymous_visitors_are_sent_to_log_in(client_for, owner, name, required) -> None:
    url = reverse(name, args=[owner.tenant.pk])
    response = client_for(None).get(url)
    assert response.status_code == 302
    assert response["Location"] == f"{reverse('dashboard:login')}?next={url}"


@pytest.mark.django_db
def test_an_organisation_that_does_not_exist_is_404(client_for, owner) -> None:
    response = client_for(owner).get(reverse("dashboard:overview", args=[999_999]))
    assert response.status_code == 404


@pytest.mark.django_db
def test_an_outsider_cannot_post_to_another_organisation(client_for, owner, outsider) -> None:
    key = api_key_for(owner.tenant).api_key
    client = client_for(outsider)
    tenant_id = owner.tenant.pk
    posts = [
        (reverse("dashboard:keys", args=[tenant_id]), {"name": "stolen", "access": "full"}),
        (reverse("dashboard:key-revoke", args=[tenant_id, key.public_id]), {}),
        (
            reverse("dashboard:members", args=[tenant_id]),
            {"email": "x@example.com", "role": "owner"},
        ),
        (
            reverse("dashboard:member-role", args=[tenant_id, owner.membership.pk]),
            {"role": "member"},
        ),
        (reverse("dashboard:member-remove", args=[tenant_id, owner.membership.pk]), {}),
        (reverse("dashboard:plan-change", args=[tenant_id]), {"plan": owner.tenant.plan_id}),
        (reverse("dashboard:content-logging", args=[tenant_id]), {"retention_days": 5}),
        (reverse("dashboard:org-delete", args=[tenant_id]), {"confirm_name": "Acme"}),
    ]
    for url, data in posts:
        assert client.post(url, data).status_code == 404, url
    key.refresh_from_db()
    assert key.revoked_at is None
    assert owner.tenant.memberships.count() == 1


@pytest.mark.django_db
def test_a_member_cannot_create_keys_or_invite_by_posting(client_for, teammate) -> None:
    client = client_for(teammate)
    tenant_id = teammate.tenant.pk
    assert (
        client.post(reverse("dashboard:keys", args=[tenant_id]), {"name": "k"}).status_code == 403
    )
    response = client.post(
        reverse("dashboard:members", args=[tenant_id]), {"email": "a@b.co", "role": "member"}
    )
    assert response.status_code == 403
    assert not teammate.tenant.api_keys.exists()
    assert not teammate.tenant.invitations.exists()


@pytest.mark.django_db
def test_a_member_sees_no_admin_links(client_for, teammate) -> None:
    page = client_for(teammate).get(reverse("dashboard:overview", args=[teammate.tenant.pk]))
    assert reverse("dashboard:keys", args=[teammate.tenant.pk]) not in page.content.decode()


@pytest.mark.django_db
def test_home_redirects_to_the_current_organisation(client_for, owner) -> None:
    client = client_for(owner)
    response = client.get("/")
    assert response.status_code == 302
    assert response["Location"] == reverse("dashboard:overview", args=[owner.tenant.pk])
    client.get(response["Location"])
    assert client.session["current_tenant_id"] == owner.tenant.pk


@pytest.mark.django_db
def test_home_sends_visitors_to_log_in_and_the_homeless_to_create(client_for, owner) -> None:
    from tests.factories import UserFactory

    landing = client_for(None).get("/")
    assert landing.status_code == 200  # the landing page (issue 17), with a way to log in
    assert reverse("dashboard:login") in landing.content.decode()
    homeless = UserFactory()
    homeless.save()
    client = client_for(None)
    client.force_login(homeless)
    assert client.get("/")["Location"] == reverse("dashboard:org-create")
