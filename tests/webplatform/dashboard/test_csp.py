# ruff: noqa: F811  (the fixtures imported from test_browser are parameters here)
"""Content-Security-Policy and HSTS (docs/reliability.md, "Hostile input").

The headers on the dashboard's pages and the API, then the pages whose scripts and styles
the policy governs (the overview's quota meters, the playground streaming an answer over
the websocket, the usage charts) in a real browser, which must report no violation of the
policy. The browser fixtures are those of ``test_browser``.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.test import Client

from tests.webplatform.dashboard.test_browser import (  # noqa: F401  (fixtures)
    CHROMIUM,
    browser,
    page,
    png,
    server,
    sign_up,
    static_files_served,
)
from tests.webplatform.live_server import live_asgi_server  # noqa: F401  (fixture)


def _directives(header: str) -> dict[str, list[str]]:
    parsed = {}
    for part in header.split(";"):
        name, *values = part.split()
        parsed[name] = values
    return parsed


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/accounts/login/", "/accounts/signup/", "/v1/models"])
def test_every_response_carries_a_strict_content_security_policy(path: str) -> None:
    response = Client().get(path)

    policy = _directives(response.headers["Content-Security-Policy"])
    assert policy["script-src"] == ["'self'"]  # no 'unsafe-inline', no 'unsafe-eval'
    assert policy["style-src"] == ["'self'"]
    assert policy["default-src"] == ["'self'"]
    assert policy["object-src"] == ["'none'"]
    assert policy["frame-ancestors"] == ["'none'"]


@pytest.mark.django_db
def test_dashboard_templates_have_no_inline_script_or_style(settings) -> None:
    from pathlib import Path

    for template in (Path(settings.BASE_DIR) / "templates").rglob("*.html"):
        text = template.read_text()
        assert " style=" not in text, template
        assert "<style" not in text, template
        for tag in re.findall(r"<script\b[^>]*>", text):
            assert "src=" in tag or "application/json" in tag, (template, tag)
        assert not re.search(r"\son[a-z]+=", text), template  # no onclick= and the like


@pytest.mark.django_db
def test_https_responses_carry_hsts_in_production_settings(settings) -> None:
    from django.core.checks import run_checks

    settings.SECURE_HSTS_SECONDS = 31_536_000  # the production default (SECURE_COOKIES)
    response = Client().get("/accounts/login/", secure=True)

    assert response.headers["Strict-Transport-Security"] == ("max-age=31536000; includeSubDomains")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Referrer-Policy"] == "same-origin"
    # Django's deployment checks: only the two deliberate choices remain (plain HTTP is
    # redirected by the TLS proxy, since probes reach pods by plain HTTP; the preload list
    # is an owner's decision).
    warnings = run_checks(include_deployment_checks=True, tags=["security"])
    assert {w.id for w in warnings} <= {"security.W008", "security.W021"}, warnings


def test_the_production_defaults_turn_hsts_on(tmp_path: Any) -> None:
    """The settings module itself, read fresh with a production environment (no DEBUG, Redis
    configured): HSTS for a year; off in the embedded mode."""
    import os
    import subprocess
    import sys

    code = "from django.conf import settings as s; print(s.SECURE_HSTS_SECONDS)"
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("SECURE_HSTS_SECONDS", "SECURE_COOKIES", "DJANGO_DEBUG")
    }
    base |= {"DJANGO_SETTINGS_MODULE": "webplatform.settings", "PLATFORM_VAR_DIR": str(tmp_path)}
    production = {**base, "REDIS_URL": "redis://127.0.0.1:6379/13"}
    embedded = {k: v for k, v in base.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    for env, expected in ((production, "31536000"), (embedded, "0")):
        out = subprocess.run(
            [sys.executable, "-c", "import django; django.setup(); " + code],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.strip() == expected


# --- in the browser -----------------------------------------------------------------------

_COLLECT_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", function (e) {
  window.__cspViolations.push(e.violatedDirective + " " + e.blockedURI);
});
"""


@pytest.mark.slow
@pytest.mark.skipif(not __import__("shutil").which(CHROMIUM), reason="needs Debian's chromium")
def test_the_dashboard_scripts_run_under_the_policy(page: Any, server) -> None:
    console_violations: list[str] = []
    page.on(
        "console",
        lambda m: (
            console_violations.append(m.text) if "Content Security Policy" in m.text else None
        ),
    )
    page.add_init_script(_COLLECT_VIOLATIONS)

    def violations() -> list[str]:
        return list(page.evaluate("window.__cspViolations")) + console_violations

    tenant_id = sign_up(page, "csp@example.com", "Policy Makers")

    # Overview: the quota meters get their width from common.js, not a style attribute.
    response = page.goto(f"/orgs/{tenant_id}/")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    widths = page.locator(".meter > span").evaluate_all("s => s.map(e => e.style.width)")
    assert widths and all(w.endswith("%") for w in widths), widths
    assert violations() == []

    # Playground: an image preview (data:/blob:), then an answer over the websocket.
    page.goto(f"/orgs/{tenant_id}/playground/")
    page.set_input_files("#pg-file", {"name": "red.png", "mimeType": "image/png", "buffer": png()})
    page.wait_for_selector("#pg-preview:not([hidden])")
    page.fill("#pg-question", "What colour is this?")
    page.fill("#pg-max-tokens", "8")
    page.click("#pg-send")
    page.wait_for_function(
        "() => document.querySelector('#pg-answer[data-finish-reason]')"
        " || !document.getElementById('pg-error').hidden",
        timeout=90_000,
    )
    assert page.is_hidden("#pg-error"), page.inner_text("#pg-error")
    assert page.inner_text("#pg-answer").strip() != ""
    assert violations() == []

    # Usage: Chart.js (served by the project) draws both charts.
    page.goto(f"/orgs/{tenant_id}/usage/")
    page.wait_for_function("() => window.usageCharts && window.usageCharts.requests")
    assert page.evaluate("window.usageCharts.requests.data.datasets[0].data.slice(-1)[0]") == 1
    for name in ("settings", "keys", "members", "requests", "audit"):
        page.goto(f"/orgs/{tenant_id}/{name}/")
    assert violations() == []

    # The API docs: Redoc (its bundle served by the project) renders the schema; that page
    # alone allows Redoc's own <style> elements and its blob: worker.
    response = page.goto("/v1/docs")
    policy = _directives(response.headers["content-security-policy"])
    assert policy["script-src"] == ["'self'"]
    assert "'unsafe-inline'" in policy["style-src"]
    page.wait_for_selector("h1:has-text('Vision inference platform API')", timeout=30_000)
    # The one thing refused there is Redoc's "powered by" logo from its CDN: nothing is
    # loaded from outside the platform.
    refused = violations()
    assert all("https://cdn.redoc.ly/" in v for v in refused), refused
