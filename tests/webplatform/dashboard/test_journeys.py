# ruff: noqa: F811  (the fixtures imported from test_browser are parameters here)
"""Journeys of a real business user in the browser (issue 17): each test failed before its
fix. The fixtures (Chromium, the live ASGI server) are those of ``test_browser``."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.webplatform.dashboard.test_browser import (  # noqa: F401  (fixtures)
    DESKTOP,
    PASSWORD,
    PHONE,
    browser,
    page,
    server,
    sign_up,
    static_files_served,
)
from tests.webplatform.live_server import live_asgi_server  # noqa: F401  (fixture)

sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = [pytest.mark.slow]


def test_reloading_the_keys_page_after_a_create_makes_no_second_key(page: Any, server) -> None:
    from tenants.models import ApiKey

    tenant_id = sign_up(page, "reload@example.com", "Reloaders")
    page.goto(f"/orgs/{tenant_id}/keys/")
    page.fill("#id_name", "first")
    page.click("#create-key button[type=submit]")
    raw_key = page.inner_text("[data-testid=new-key]").strip()
    assert raw_key.startswith("sk_")
    page.reload()
    assert page.locator("[data-testid=new-key]").count() == 0
    assert ApiKey.objects.filter(tenant_id=tenant_id).count() == 1
    assert re.search(r"/orgs/\d+/keys/$", page.url)


def _invite(tenant: Any, inviter: Any, email: str, role: str = "member") -> str:
    """Invite ``email`` to ``tenant`` through the service; the accept link's path."""
    from tenants.services.invitations import invitation_create

    created = invitation_create(
        tenant=tenant,
        email=email,
        role=role,
        invited_by=inviter,
        actor_role="owner",
        accept_url_for=lambda token: f"/invitations/{token}/",
    )
    return f"/invitations/{created.token}/"


def test_an_invited_person_joins_without_an_organisation_of_their_own(page: Any, server) -> None:
    from tenants.models import Membership
    from tenants.services.accounts import account_sign_up

    acme = account_sign_up(email="boss@acme.test", password=PASSWORD, organisation_name="Acme")
    link = _invite(acme.tenant, acme.user, "new.hire@acme.test")
    page.goto(link)
    page.click("text=Sign up to accept")
    assert page.input_value("#id_email") == "new.hire@acme.test"
    assert page.locator("#id_organisation").count() == 0
    page.fill("#id_password1", PASSWORD)
    page.fill("#id_password2", PASSWORD)
    page.click("main form button[type=submit]")
    page.wait_for_url(f"**/orgs/{acme.tenant.pk}/")
    joined = Membership.objects.filter(user__email="new.hire@acme.test")
    assert [(m.tenant_id, m.role) for m in joined] == [(acme.tenant.pk, "member")]
    assert "Acme" in page.inner_text(".sidenav")


def test_the_plan_changes_only_after_confirmation(page: Any, server) -> None:
    from tenants.models import Tenant

    tenant_id = sign_up(page, "planner@example.com", "Planners")
    page.goto(f"/orgs/{tenant_id}/settings/")
    page.select_option("#id_plan", label="pro")
    page.click("text=Change plan…")
    # Nothing changed yet: the confirmation page compares the limits.
    assert Tenant.objects.get(pk=tenant_id).plan.name == "free"
    assert "Switch from free to pro?" in page.inner_text("h1")
    assert page.locator("#plan-compare tbody tr").count() == 4
    page.click("#confirm-plan")
    page.wait_for_url(f"**/orgs/{tenant_id}/settings/")
    assert Tenant.objects.get(pk=tenant_id).plan.name == "pro"
    assert "Plan changed to pro." in page.inner_text(".messages")
