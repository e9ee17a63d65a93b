"""The dashboard in a real browser (Debian's Chromium driven by Playwright) against the live
ASGI server: sign up, organisations, a key shown once and refused once revoked, the
playground streaming an answer over the websocket, the usage chart, and who may see what.

Screenshots of every page at desktop (1280x800) and phone (390x844) width are written to
``test-output/screenshots/``. Skipped when Chromium or Playwright is missing (``make``
installs both: ``apt-get install chromium``, pip ``playwright``).
"""

from __future__ import annotations

import io
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.conf import settings as django_settings

from tests.webplatform.live_server import live_asgi_server  # noqa: F401  (fixture)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
SCREENSHOTS = Path(django_settings.BASE_DIR) / "test-output" / "screenshots"
PASSWORD = "correct horse battery 42"

sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="needs Debian's chromium"),
]


@pytest.fixture(scope="module")
def browser(django_db_setup) -> Iterator[Any]:
    # The test database is created first: created under Playwright's event loop, the
    # server threads would not see it.
    # Playwright's sync API runs an event loop in this thread; Django would then refuse the
    # test's own (synchronous) database calls. They are not async code, so allow them.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            yield browser
            browser.close()
    finally:
        # The live server's teardown terminates the test database's other sessions; under
        # Playwright's loop that can include this thread's own connection: start afresh.
        from django.db import connections

        connections.close_all()
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture
def static_files_served(monkeypatch, settings) -> None:
    """Make the live server also serve /static/ from the finders (what ``runserver`` does;
    in production ``collectstatic`` and WhiteNoise serve the same files)."""
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

    import webplatform.asgi

    chartjs = Path(settings.BASE_DIR) / "node_modules" / "chart.js" / "dist"
    if not any(
        isinstance(d, tuple) and d[0] == "vendor/chartjs" for d in settings.STATICFILES_DIRS
    ):
        settings.STATICFILES_DIRS = [*settings.STATICFILES_DIRS, ("vendor/chartjs", chartjs)]
    # Plain-HTTP test server: the production settings mark cookies Secure.
    settings.SESSION_COOKIE_SECURE = False
    settings.CSRF_COOKIE_SECURE = False
    # Uploads are scanned where a scanner is configured (make test starts one); elsewhere
    # the production default (scanning required) would refuse every image.
    settings.CLAMD_REQUIRED = bool(settings.CLAMD_URL)
    original = webplatform.asgi.application
    static = ASGIStaticFilesHandler(original)

    async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith(
            "/" + settings.STATIC_URL.lstrip("/")
        ):
            return await static(scope, receive, send)
        return await original(scope, receive, send)

    monkeypatch.setattr(webplatform.asgi, "application", application)


@pytest.fixture
def server(static_files_served, live_asgi_server) -> Any:  # noqa: F811  (fixture)
    return live_asgi_server


@pytest.fixture
def page(browser, server) -> Iterator[Any]:
    context = browser.new_context(viewport=DESKTOP, base_url=server.url, locale="en-GB")
    outside: list[str] = []

    def only_local(route: Any) -> None:
        # Works offline: every script, style and font must come from the project.
        if route.request.url.startswith(server.url) or route.request.url.startswith(server.ws_url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", only_local)
    page = context.new_page()
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert outside == [], f"requests left the server: {outside}"
    assert errors == [], f"JavaScript errors: {errors}"


def snap(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}-desktop.png"), full_page=True)
    page.set_viewport_size(PHONE)
    page.screenshot(path=str(SCREENSHOTS / f"{name}-phone.png"), full_page=True)
    # Usable on a phone: nothing wider than the screen (wide tables scroll inside their box).
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], name
    page.set_viewport_size(DESKTOP)


def sign_up(page: Any, email: str, organisation: str) -> int:
    page.goto("/accounts/signup/")
    page.fill("#id_email", email)
    page.fill("#id_organisation", organisation)
    page.fill("#id_password1", PASSWORD)
    page.fill("#id_password2", PASSWORD)
    page.click("form button[type=submit]")
    page.wait_for_url(re.compile(r"/orgs/\d+/$"))
    return int(re.search(r"/orgs/(\d+)/$", page.url).group(1))


def log_in(page: Any, email: str) -> None:
    page.goto("/accounts/login/")
    page.fill("#id_username", email)
    page.fill("#id_password", PASSWORD)
    page.click("form button[type=submit]")
    page.wait_for_url(re.compile(r"/orgs/\d+/$"))


def png(width: int = 64, height: int = 48) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_owner_signs_up_makes_a_key_uses_the_playground_and_sees_usage(page, server) -> None:
    page.goto("/")
    snap(page, "landing")
    page.click("main >> text=Log in")
    assert page.url.endswith("/accounts/login/")
    snap(page, "login")
    page.goto("/accounts/signup/")
    snap(page, "signup")
    tenant_id = sign_up(page, "ada@example.com", "Analytical Engines")
    assert "Analytical Engines" in page.inner_text(".sidenav")

    # A second organisation, then back to the first through the switcher.
    page.click("text=New organisation")
    page.fill("#id_name", "Side Project")
    page.click("main form button[type=submit]")
    page.wait_for_url(re.compile(r"/orgs/\d+/$"))
    assert f"/orgs/{tenant_id}/" not in page.url
    page.select_option("#org-switch", str(tenant_id))
    page.wait_for_url(f"**/orgs/{tenant_id}/")
    snap(page, "overview")

    # A key, shown once.
    page.click(".sidenav >> text=API keys")
    page.fill("#id_name", "browser test")
    page.click("#create-key button[type=submit]")
    raw_key = page.inner_text("[data-testid=new-key]").strip()
    assert raw_key.startswith("sk_")
    snap(page, "keys")
    page.goto(f"/orgs/{tenant_id}/keys/")
    assert page.locator("[data-testid=new-key]").count() == 0
    assert raw_key not in page.content()
    public_id = raw_key.split("_")[1]
    assert f"sk_{public_id}_…" in page.inner_text("#key-list")

    headers = {"Authorization": f"Bearer {raw_key}"}
    models = httpx.get(f"{server.url}/v1/models", headers=headers, timeout=10)
    assert models.status_code == 200
    assert "glm-4.6v-flash" in [m["id"] for m in models.json()["data"]]

    page.click(f"tr[data-key='{public_id}'] >> text=Revoke")
    page.click("#confirm-revoke")
    page.wait_for_url(f"**/orgs/{tenant_id}/keys/")
    assert "revoked" in page.inner_text(f"tr[data-key='{public_id}']")
    refused = httpx.get(f"{server.url}/v1/models", headers=headers, timeout=10)
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "api_key_revoked"

    # The playground: a file that is not an image is refused before upload...
    page.goto(f"/orgs/{tenant_id}/playground/")
    page.set_input_files(
        "#pg-file", {"name": "notes.png", "mimeType": "image/png", "buffer": b"hello"}
    )
    page.wait_for_selector("#pg-problem:not([hidden])")
    assert "unsupported_image_type" in page.inner_text("#pg-problem")
    # ...an image is previewed with its size, and the answer streams back.
    page.set_input_files("#pg-file", {"name": "red.png", "mimeType": "image/png", "buffer": png()})
    page.wait_for_selector("#pg-preview:not([hidden])")
    page.wait_for_function(
        "() => document.getElementById('pg-file-info').textContent.includes('64×48')"
    )
    assert page.is_hidden("#pg-problem")
    page.fill("#pg-question", "What colour is this?")
    page.fill("#pg-max-tokens", "16")
    page.click("#pg-send")
    page.wait_for_function(
        "() => document.querySelector('#pg-answer[data-finish-reason]')"
        " || !document.getElementById('pg-error').hidden",
        timeout=90_000,
    )
    assert page.is_hidden("#pg-error"), page.inner_text("#pg-error")
    assert page.inner_text("#pg-answer").strip() != ""
    assert re.match(r"\d+ \+ \d+ = \d+", page.inner_text("#pg-tokens"))
    # Humanised in the page's language: "850 ms" or "19.7 sec" (issue 17).
    assert re.fullmatch(r"[\d.,]+ (ms|sec)", page.inner_text("#pg-latency"))
    page.click("#pg-code-box summary")
    page.click(".tabs [data-lang=python]")
    assert "from openai import OpenAI" in page.inner_text("#pg-code")
    snap(page, "playground")

    # The usage chart shows that request.
    page.goto(f"/orgs/{tenant_id}/usage/")
    page.wait_for_function("() => window.usageCharts && window.usageCharts.requests")
    today = page.evaluate("window.usageCharts.requests.data.datasets[0].data.slice(-1)[0]")
    assert today == 1
    assert page.inner_text("[data-testid=total-requests]") == "1"
    snap(page, "usage")

    for name in ("requests", "members", "audit", "settings"):
        page.goto(f"/orgs/{tenant_id}/{name}/")
        snap(page, name)
    page.goto(f"/orgs/{tenant_id}/audit/")
    actions = page.locator("#audit-log tr[data-action]").evaluate_all(
        "rows => rows.map(r => r.dataset.action)"
    )
    assert {"organisation_created", "key_created", "key_revoked"} <= set(actions)
    page.goto(f"/orgs/{tenant_id}/")
    assert page.inner_text(".grid .stat >> nth=3") == "1"  # today's requests, after the quotas
    snap(page, "dashboard")


def test_a_member_cannot_open_keys_and_an_outsider_sees_nothing(page, server) -> None:
    from tenants.models import Membership
    from tenants.services.accounts import account_sign_up
    from tenants.services.tenants import membership_create

    acme = account_sign_up(email="owner@acme.test", password=PASSWORD, organisation_name="Acme")
    member = account_sign_up(email="member@acme.test", password=PASSWORD, organisation_name="Own")
    membership_create(tenant=acme.tenant, user=member.user, role=Membership.Role.MEMBER)
    account_sign_up(email="eve@globex.test", password=PASSWORD, organisation_name="Globex")

    log_in(page, "member@acme.test")
    page.goto(f"/orgs/{acme.tenant.pk}/")
    assert page.locator(".sidenav >> text=API keys").count() == 0
    response = page.goto(f"/orgs/{acme.tenant.pk}/keys/")
    assert response.status == 403
    snap(page, "forbidden")
    assert page.goto(f"/orgs/{acme.tenant.pk}/playground/").status == 200
    page.click("text=Log out")

    log_in(page, "eve@globex.test")
    for path in ("", "keys/", "usage/", "playground/", "members/", "settings/"):
        response = page.goto(f"/orgs/{acme.tenant.pk}/{path}")
        assert response.status == 404, path
    snap(page, "not-found")
    assert "Acme" not in page.content()


def test_the_dashboard_speaks_chinese_on_a_phone(browser, server) -> None:
    context = browser.new_context(viewport=PHONE, base_url=server.url, locale="zh-CN")
    try:
        page = context.new_page()
        page.goto("/accounts/login/")
        assert page.get_attribute("html", "lang") == "zh-hans"
        assert "登录" in page.inner_text("h1")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"]  # no sideways scrolling on a phone
        page.screenshot(path=str(SCREENSHOTS / "login-zh-phone.png"), full_page=True)
    finally:
        context.close()


def test_the_empty_playground_shows_no_broken_image(page, server) -> None:
    """Nothing chosen yet: the preview stays hidden (a CSS rule once beat ``hidden``)."""
    tenant_id = sign_up(page, "empty@example.com", "Empty")
    page.goto(f"/orgs/{tenant_id}/playground/")
    assert page.get_attribute("#pg-preview", "hidden") is not None
    assert not page.is_visible("#pg-preview")
    page.set_input_files("#pg-file", {"name": "red.png", "mimeType": "image/png", "buffer": png()})
    page.wait_for_selector("#pg-preview", state="visible")
