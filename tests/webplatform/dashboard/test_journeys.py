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
    SCREENSHOTS,
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


def _phone_page(browser: Any, server: Any, locale: str = "en-GB") -> Any:
    context = browser.new_context(viewport=PHONE, base_url=server.url, locale=locale)
    page = context.new_page()
    page.set_default_timeout(20_000)
    return page


@pytest.mark.parametrize("locale", ["en-GB", "zh-CN"])
def test_on_a_phone_every_navigation_entry_is_reachable(browser, server, locale) -> None:
    from tenants.models import Membership
    from tenants.services.accounts import account_sign_up
    from tenants.services.tenants import membership_create

    email = f"phone-{locale}@example.com"
    owner = account_sign_up(email=email, password=PASSWORD, organisation_name="Phone Co")
    member = account_sign_up(
        email=f"m-{locale}@example.com", password=PASSWORD, organisation_name="Other"
    )
    membership_create(tenant=owner.tenant, user=member.user, role=Membership.Role.MEMBER)
    page = _phone_page(browser, server, locale)
    try:
        page.goto("/accounts/login/")
        page.fill("#id_username", email)
        page.fill("#id_password", PASSWORD)
        page.click("main form button[type=submit]")
        page.wait_for_url(re.compile(r"/orgs/\d+/$"))
        page.goto(f"/orgs/{owner.tenant.pk}/members/")
        # Every entry of the navigation is on screen: none hidden in a sideways strip.
        links = page.locator(".sidenav a")
        assert links.count() == 9
        for i in range(links.count()):
            box = links.nth(i).bounding_box()
            assert box is not None and box["x"] >= 0, links.nth(i).inner_text()
            assert box["x"] + box["width"] <= PHONE["width"], links.nth(i).inner_text()
            assert links.nth(i).is_visible()
        # The header stays compact.
        assert page.locator(".topbar").bounding_box()["height"] <= 100
        # The role select shows its whole label.
        fits = page.evaluate(
            """() => [...document.querySelectorAll('main table select')].map(s => {
                 const c = document.createElement('canvas').getContext('2d');
                 c.font = getComputedStyle(s).font;
                 const text = s.options[s.selectedIndex].text;
                 return s.clientWidth - 24 >= c.measureText(text).width;
               })"""
        )
        assert fits and all(fits), fits
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"members-{locale}-phone.png"))
        # And a link in the last row leads where it says.
        links.last.click()
        page.wait_for_url(f"**/orgs/{owner.tenant.pk}/settings/")
    finally:
        page.context.close()


def test_every_page_has_a_favicon_and_the_snippets_read_api_key(page: Any, server) -> None:
    tenant_id = sign_up(page, "icon@example.com", "Icons")
    missing: list[str] = []
    page.on("response", lambda r: r.status == 404 and missing.append(r.url))
    page.goto(f"/orgs/{tenant_id}/playground/")
    icon = page.get_attribute("link[rel=icon]", "href")
    assert icon and page.request.get(server.url + icon).status == 200
    favicon = page.request.get(server.url + "/favicon.ico")
    assert favicon.status == 200 and "svg" in favicon.headers["content-type"]
    assert missing == []
    # Each snippet takes the key from $API_KEY, as the note above them says.
    page.click("#pg-code-box summary")
    note = page.inner_text("#pg-code-box p")
    assert "API_KEY environment variable" in note and "YOUR_API_KEY" not in note
    for lang, reads in (
        ("curl", "$API_KEY"),
        ("python", 'os.environ["API_KEY"]'),
        ("javascript", "process.env.API_KEY"),
    ):
        page.click(f".tabs [data-lang={lang}]")
        assert reads in page.inner_text("#pg-code"), lang
        assert "YOUR_API_KEY" not in page.inner_text("#pg-code")


def test_a_failed_submit_moves_focus_to_an_announced_error_summary(page: Any, server) -> None:
    page.goto("/accounts/signup/")
    # The first Tab reaches the skip link, which leads to the content.
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip-link"
    assert page.get_attribute(".skip-link", "href") == "#main"
    assert page.get_attribute("#id_email", "autocomplete") == "email"
    page.fill("#id_email", "focus@example.com")
    page.fill("#id_organisation", "Focus")
    page.fill("#id_password1", PASSWORD)
    page.fill("#id_password2", PASSWORD + "x")
    with page.expect_navigation(wait_until="load"):
        page.click("main form button[type=submit]")
    active = page.evaluate(
        "[document.activeElement.getAttribute('role'), document.activeElement.innerText]"
    )
    assert active[0] == "alert"
    assert "The two passwords differ." in active[1]
    # Its entry links to the field to fix.
    page.click("[data-error-summary] a")
    assert page.evaluate("location.hash") == "#id_password2"

    page.goto("/accounts/login/")
    page.fill("#id_username", "focus@example.com")
    page.fill("#id_password", "wrong")
    with page.expect_navigation(wait_until="load"):
        page.click("main form button[type=submit]")
    assert page.evaluate("document.activeElement.getAttribute('role')") == "alert"
    assert page.get_attribute("#id_username", "autocomplete") == "email"


def test_the_landing_page_says_what_the_product_does_and_leads_on(page: Any, server) -> None:
    page.goto("/")
    assert page.url == server.url + "/"
    assert "images" in page.inner_text("h1")
    assert page.locator(".examples .panel").count() >= 3
    assert page.get_attribute("main >> text=API docs", "href") == "/v1/docs"
    assert page.request.get(server.url + "/v1/docs").status == 200
    page.click("#landing-signup")
    page.wait_for_url("**/accounts/signup/")
    tenant_id = sign_up(page, "landed@example.com", "Landed")
    # Signed in, / is the dashboard, and its navigation links to the API docs.
    page.goto("/")
    page.wait_for_url(f"**/orgs/{tenant_id}/")
    assert page.get_attribute(".sidenav >> text=API docs", "href") == "/v1/docs"


def test_a_request_is_found_by_its_id_and_opened_from_the_log(page: Any, server) -> None:
    from django.utils import timezone

    from tenants.models import UsageRecord

    tenant_id = sign_up(page, "detail@example.com", "Details")
    for i, status in enumerate(("ok", "error")):
        UsageRecord.objects.create(
            tenant_id=tenant_id,
            request_id=f"chatcmpl-detail{i}",
            channel="rest",
            model="glm-4.6v-flash",
            status=status,
            error_code="" if status == "ok" else "model_not_found",
            prompt_tokens=1234,
            completion_tokens=56,
            time_to_first_token_ms=420,
            total_latency_ms=2345,
            created_at=timezone.now(),
        )
    page.goto(f"/orgs/{tenant_id}/requests/")
    page.fill("#id_request_id", "chatcmpl-detail1")
    page.click("#request-search button")
    page.wait_for_url(f"**/orgs/{tenant_id}/requests/chatcmpl-detail1/")
    detail = page.inner_text("#request-detail")
    assert "model_not_found" in detail and "1,234" in detail and "2.3 sec" in detail
    page.click("text=← Request log")
    page.click("tr[data-request='chatcmpl-detail0'] a")
    page.wait_for_url(f"**/orgs/{tenant_id}/requests/chatcmpl-detail0/")
    assert page.inner_text("#request-id") == "chatcmpl-detail0"
    page.goto(f"/orgs/{tenant_id}/requests/")
    page.fill("#id_request_id", "chatcmpl-nothing")
    page.click("#request-search button")
    assert "No request with the id chatcmpl-nothing." in page.inner_text(".messages")


def test_the_keys_page_shows_each_keys_usage_and_renames_a_key(page: Any, server) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from tenants.models import ApiKey, UsageRecord

    tenant_id = sign_up(page, "keyuse@example.com", "Key Users")
    page.goto(f"/orgs/{tenant_id}/keys/")
    page.fill("#id_name", "backend")
    page.click("#create-key button[type=submit]")
    key = ApiKey.objects.get(tenant_id=tenant_id)
    now = timezone.now()
    for i, when in enumerate([now, now, now - timedelta(days=3)]):
        UsageRecord.objects.create(
            tenant_id=tenant_id,
            api_key=key,
            request_id=f"keyuse-{i}",
            channel="rest",
            model="glm-4.6v-flash",
            status="ok",
            prompt_tokens=1000,
            completion_tokens=500,
            created_at=when,
        )
    page.goto(f"/orgs/{tenant_id}/keys/")
    row = f"tr[data-key='{key.public_id}']"
    assert page.inner_text(f"{row} [data-usage=today]").split() == [
        "2",
        "requests",
        "3,000",
        "tokens",
    ]
    assert page.inner_text(f"{row} [data-usage='30d']").split() == [
        "3", "requests", "4,500", "tokens",
    ]  # fmt: skip
    page.click(f"{row} .rename summary")
    page.fill(f"{row} .rename input[name=name]", "backend (prod)")
    page.click(f"{row} .rename button")
    page.wait_for_url(f"**/orgs/{tenant_id}/keys/")
    assert "backend (prod)" in page.inner_text(row)
    assert ApiKey.objects.get(pk=key.pk).name == "backend (prod)"


def test_a_new_organisation_gets_a_checklist_and_charts_say_there_is_no_data(
    page: Any, server
) -> None:
    tenant_id = sign_up(page, "newbie@example.com", "Newbies")
    steps = page.locator("#onboarding li")
    assert steps.count() == 4
    assert page.locator("#onboarding li.done").count() == 0
    page.goto(f"/orgs/{tenant_id}/usage/")
    assert page.locator("[data-empty-chart]").count() == 3
    assert page.locator("canvas").count() == 0
    page.goto(f"/orgs/{tenant_id}/keys/")
    page.fill("#id_name", "first")
    page.click("#create-key button[type=submit]")
    page.goto(f"/orgs/{tenant_id}/")
    assert page.get_attribute("#onboarding li[data-step=key]", "class") == "done"


def test_an_admin_without_a_mail_server_copies_the_invite_link(page: Any, server) -> None:
    tenant_id = sign_up(page, "inviter@example.com", "Inviters")
    page.goto(f"/orgs/{tenant_id}/members/")
    page.fill("#id_email", "friend@example.com")
    page.click("main form.inline-form button[type=submit]")
    page.wait_for_url(f"**/orgs/{tenant_id}/members/")
    link = page.inner_text("#invite-link-value").strip()
    assert re.search(r"/invitations/[\w-]+/$", link)
    page.click("#invite-link button[data-copy]")
    page.wait_for_function(
        "() => document.querySelector('#invite-link button').textContent === 'Copied'"
    )
    # Shown once: a reload no longer shows it; the link itself works.
    page.reload()
    assert page.locator("#invite-link").count() == 0
    page.context.clear_cookies()
    page.goto(link)
    assert "Join Inviters" in page.inner_text("h1")


def test_a_signed_in_person_changes_their_email_password_and_organisation_name(
    page: Any, server
) -> None:
    tenant_id = sign_up(page, "old@example.com", "Old Name")
    page.click(".topbar a.who")
    page.wait_for_url("**/accounts/profile/")
    page.fill("#id_email", "new@example.com")
    page.fill("#email-form #id_password", "wrong password")
    page.click("#email-form button")
    assert "The password is not right." in page.inner_text("[data-error-summary]")
    page.fill("#id_email", "new@example.com")
    page.fill("#email-form #id_password", PASSWORD)
    page.click("#email-form button")
    page.wait_for_url("**/accounts/profile/")
    assert "new@example.com" in page.inner_text(".topbar")
    page.fill("#id_old_password", PASSWORD)
    page.fill("#id_new_password1", "a brand new passphrase 7")
    page.fill("#id_new_password2", "a brand new passphrase 7")
    page.click("#password-form button")
    page.wait_for_url("**/accounts/profile/")
    assert "Your password was changed." in page.inner_text(".messages")
    page.goto(f"/orgs/{tenant_id}/settings/")
    page.fill("#org-rename #id_name", "New Name")
    page.click("#org-rename button")
    page.wait_for_url(f"**/orgs/{tenant_id}/settings/")
    assert "New Name" in page.inner_text(".sidenav")
    # The new e-mail and password log in.
    page.click("text=Log out")
    page.goto("/accounts/login/")
    page.fill("#id_username", "new@example.com")
    page.fill("#id_password", "a brand new passphrase 7")
    page.click("main form button[type=submit]")
    page.wait_for_url(f"**/orgs/{tenant_id}/")


def _wait_answer(page: Any) -> None:
    page.wait_for_function(
        "() => document.querySelector('#pg-answer[data-finish-reason]')"
        " || !document.getElementById('pg-error').hidden",
        timeout=90_000,
    )
    assert page.is_hidden("#pg-error"), page.inner_text("#pg-error")


def test_the_playground_holds_a_conversation_about_one_image(page: Any, server) -> None:
    from tenants.models import UsageRecord
    from tests.webplatform.dashboard.test_browser import png

    tenant_id = sign_up(page, "talker@example.com", "Talkers")
    page.goto(f"/orgs/{tenant_id}/playground/")
    page.set_input_files("#pg-file", {"name": "red.png", "mimeType": "image/png", "buffer": png()})
    page.wait_for_selector("#pg-preview:not([hidden])")
    page.fill("#pg-max-tokens", "4")
    page.fill("#pg-question", "What colour is this?")
    page.press("#pg-question", "Control+Enter")  # sends without the button
    _wait_answer(page)
    first_answer = page.inner_text("#pg-answer")
    page.click("#pg-copy-answer")
    page.wait_for_function(
        "() => document.getElementById('pg-copy-answer').textContent === 'Copied'"
    )
    page.fill("#pg-question", "And what shape?")
    page.press("#pg-question", "Meta+Enter")
    _wait_answer(page)
    # The first turn moved into the conversation above the new answer.
    assert page.locator("#pg-history li").count() == 1
    assert "What colour is this?" in page.inner_text("#pg-history")
    assert first_answer.strip() in page.inner_text("#pg-history")
    first, second = UsageRecord.objects.filter(tenant_id=tenant_id).order_by("created_at")
    # The follow-up carried no image of its own, yet the model saw the first turn and its image.
    assert second.prompt_tokens > first.prompt_tokens
    page.click("#pg-new")
    assert page.locator("#pg-history li").count() == 0


def test_times_are_local_and_dark_mode_follows_the_system(browser, server) -> None:
    from datetime import UTC, datetime

    from tenants.models import UsageRecord
    from tenants.services.accounts import account_sign_up

    signed = account_sign_up(email="tz@example.com", password=PASSWORD, organisation_name="TZ")
    UsageRecord.objects.create(
        tenant=signed.tenant,
        request_id="req_tz",
        channel="rest",
        model="glm-4.6v-flash",
        status="ok",
        created_at=datetime(2026, 12, 1, 23, 30, 5, tzinfo=UTC),
    )
    context = browser.new_context(
        viewport=DESKTOP,
        base_url=server.url,
        locale="en-GB",
        timezone_id="Asia/Shanghai",
        color_scheme="dark",
    )
    try:
        page = context.new_page()
        page.goto("/accounts/login/")
        page.fill("#id_username", "tz@example.com")
        page.fill("#id_password", PASSWORD)
        page.click("main form button[type=submit]")
        page.wait_for_url(re.compile(r"/orgs/\d+/$"))
        page.goto(f"/orgs/{signed.tenant.pk}/requests/")
        cell = page.locator("tr[data-request=req_tz] time")
        assert cell.inner_text() == "2026-12-02 07:30:05"  # UTC+8, the viewer's zone
        assert "2026-12-01 23:30:05 UTC" in cell.get_attribute("title")
        assert cell.get_attribute("data-zone") == "Asia/Shanghai"
        background = page.evaluate("getComputedStyle(document.documentElement).backgroundColor")
        channels = [int(c) for c in re.findall(r"\d+", background)[:3]]
        assert sum(channels) < 3 * 60, background  # dark
        page.emulate_media(color_scheme="light")
        background = page.evaluate("getComputedStyle(document.documentElement).backgroundColor")
        assert sum(int(c) for c in re.findall(r"\d+", background)[:3]) > 3 * 200, background
    finally:
        context.close()


def test_the_playground_system_prompt_reaches_the_model_and_the_snippets(page: Any, server) -> None:
    from tenants.models import UsageRecord
    from tests.webplatform.dashboard.test_browser import png

    tenant_id = sign_up(page, "system@example.com", "Instructors")
    page.goto(f"/orgs/{tenant_id}/playground/")
    page.set_input_files("#pg-file", {"name": "red.png", "mimeType": "image/png", "buffer": png()})
    page.wait_for_selector("#pg-preview:not([hidden])")
    page.fill("#pg-max-tokens", "4")
    page.fill("#pg-question", "What colour is this?")
    page.click("#pg-send")
    _wait_answer(page)
    page.goto(f"/orgs/{tenant_id}/playground/")  # a new conversation
    page.set_input_files("#pg-file", {"name": "red.png", "mimeType": "image/png", "buffer": png()})
    page.wait_for_selector("#pg-preview:not([hidden])")
    page.fill("#pg-max-tokens", "4")
    page.click("#pg-system-box summary")
    instructions = "Answer in one short sentence and give every date as YYYY-MM-DD, please."
    page.fill("#pg-system", instructions)
    page.fill("#pg-question", "What colour is this?")
    page.click("#pg-send")
    _wait_answer(page)
    plain, instructed = UsageRecord.objects.filter(tenant_id=tenant_id).order_by("created_at")
    # Same image and question in a fresh conversation: the difference is the system message.
    assert instructed.prompt_tokens >= plain.prompt_tokens + 10
    # "View code" sends the same system message.
    assert '"role": "system"' in (page.text_content("#pg-code") or "")
    assert instructions in (page.text_content("#pg-code") or "")
