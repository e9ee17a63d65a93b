# ruff: noqa: F811  (the fixtures imported from test_browser are parameters here)
"""The README's screenshots, taken by Playwright on a live server with a little data.

Run with ``README_SCREENSHOTS=1 pytest tests/webplatform/dashboard/test_readme_screenshots.py``;
the images land in ``test-output/readme/`` (desktop 1280x800 and phone 390x844, English and
Simplified Chinese), to be copied to ``docs/screenshots/``. Chinese needs a CJK font
(Debian: ``apt-get install fonts-wqy-microhei``). The playground's answer comes from the
tiny test model, so it is gibberish, honestly.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings

from tests.webplatform.dashboard.test_browser import (  # noqa: F401  (fixtures)
    DESKTOP,
    PASSWORD,
    PHONE,
    browser,
    png,
    server,
    static_files_served,
)
from tests.webplatform.live_server import live_asgi_server  # noqa: F401  (fixture)

OUT = Path(django_settings.BASE_DIR) / "test-output" / "readme"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.environ.get("README_SCREENSHOTS"), reason="set README_SCREENSHOTS=1 to take them"
    ),
]


def _data() -> Any:
    import random

    from django.utils import timezone

    from tenants.models import UsageRecord
    from tenants.services.accounts import account_sign_up
    from tenants.services.api_keys import api_key_create_audited

    signed = account_sign_up(
        email="ada@example.com", password=PASSWORD, organisation_name="Analytical Engines"
    )
    key = api_key_create_audited(
        tenant=signed.tenant,
        name="backend",
        created_by=signed.user,
        allowed_models=[],
        access="full",
        expires_at=None,
    ).api_key
    rng = random.Random(17)
    now = timezone.now()
    records = []
    for day in range(14):
        for i in range(rng.randint(20, 60)):
            records.append(
                UsageRecord(
                    tenant=signed.tenant,
                    api_key=key,
                    request_id=f"req_demo_{day}_{i}",
                    channel="rest",
                    model="glm-4.6v-flash",
                    status="error" if rng.random() < 0.05 else "ok",
                    error_code="",
                    prompt_tokens=rng.randint(600, 1400),
                    completion_tokens=rng.randint(40, 300),
                    image_count=1,
                    time_to_first_token_ms=rng.randint(150, 400),
                    total_latency_ms=rng.randint(800, 3500),
                    created_at=now - timedelta(days=day, minutes=i * 7),
                )
            )
    UsageRecord.objects.bulk_create(records)
    return signed


def test_take_the_readme_screenshots(browser, server) -> None:
    signed = _data()
    tenant_id = signed.tenant.pk
    OUT.mkdir(parents=True, exist_ok=True)
    for lang, locale in (("en", "en-GB"), ("zh", "zh-CN")):
        for width, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
            context = browser.new_context(viewport=viewport, base_url=server.url, locale=locale)
            page = context.new_page()
            page.set_default_timeout(30_000)
            page.goto("/accounts/login/")
            page.fill("#id_username", "ada@example.com")
            page.fill("#id_password", PASSWORD)
            page.click("main form button[type=submit]")
            page.wait_for_url(f"**/orgs/{tenant_id}/")
            page.screenshot(path=str(OUT / f"overview-{lang}-{width}.png"))
            page.goto(f"/orgs/{tenant_id}/usage/")
            page.wait_for_function("() => window.usageCharts && window.usageCharts.requests")
            page.screenshot(path=str(OUT / f"usage-{lang}-{width}.png"))
            page.goto(f"/orgs/{tenant_id}/playground/")
            page.set_input_files(
                "#pg-file", {"name": "red.png", "mimeType": "image/png", "buffer": png(320, 200)}
            )
            page.wait_for_selector("#pg-preview:not([hidden])")
            page.fill("#pg-max-tokens", "24")
            page.fill("#pg-temperature", "1.3")  # the tiny model stops at once when cooler
            page.fill("#pg-question", "What colour is this?" if lang == "en" else "这是什么颜色？")
            page.press("#pg-question", "Control+Enter")
            page.wait_for_function(
                "() => document.querySelector('#pg-answer[data-finish-reason]')", timeout=90_000
            )
            page.screenshot(path=str(OUT / f"playground-{lang}-{width}.png"))
            page.goto("/")
            page.context.clear_cookies()
            page.goto("/")
            page.screenshot(path=str(OUT / f"landing-{lang}-{width}.png"))
            context.close()
    assert len(list(OUT.glob("*.png"))) == 16
