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
