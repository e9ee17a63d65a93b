"""Every visible string of every dashboard page is in the zh-Hans catalogue.

Each page is rendered in Simplified Chinese with data on it (a key, a member, an invitation,
requests, audit entries). Its visible text (text nodes outside scripts, styles and code, and
the attributes people read: placeholder, aria-label, title, alt) and the translated strings
the pages hand to their scripts (the ``i18n`` and ``errors`` parts of their JSON) must hold
no English word beyond the data shown, product names and units. A string left out of the
catalogue, or never marked for translation, fails the test with the page and the text.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.test import Client
from django.urls import reverse

PO = Path(django_settings.BASE_DIR) / "locale" / "zh_Hans" / "LC_MESSAGES" / "django.po"
ZH = {"HTTP_ACCEPT_LANGUAGE": "zh-hans"}

# Words that stay as they are in Chinese text: product and format names, units, codes.
KEPT = {
    "API", "ID", "Token", "token", "tokens", "JPEG", "PNG", "WebP", "GIF", "CSV", "curl",
    "Python", "JavaScript", "Vision", "Platform", "UTC", "English", "p50", "p95", "ms",
    "sk", "WebSocket", "REST", "export", "API_KEY", "e-mail", "OpenAI", "Ctrl", "Cmd",
    "Enter", "Mac", "SDK", "US", "USD", "KB", "MB", "GB", "bytes", "system", "prefers", "color", "scheme",
}  # fmt: skip
SKIPPED_TAGS = {"script", "style", "code", "pre"}
READ_ATTRIBUTES = ("placeholder", "aria-label", "title", "alt")


class VisibleText(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.skipping: list[str] = []
        self.texts: list[str] = []
        self.scripts: list[str] = []
        self._in_json = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "script" and values.get("type") == "application/json":
            self._in_json = True
        if tag in SKIPPED_TAGS:
            self.skipping.append(tag)
        for name in READ_ATTRIBUTES:
            if values.get(name):
                self.texts.append(str(values[name]))

    def handle_endtag(self, tag: str) -> None:
        if self.skipping and self.skipping[-1] == tag:
            self.skipping.pop()
        if tag == "script":
            self._in_json = False

    def handle_data(self, data: str) -> None:
        if self._in_json:
            self.scripts.append(data)
        elif not self.skipping and data.strip():
            self.texts.append(data.strip())


def _strings_for_scripts(raw: str) -> list[str]:
    """The translated strings of a page's JSON: its ``i18n`` and ``errors`` objects."""
    data = json.loads(raw)
    found: list[str] = []
    for part in ("i18n", "errors"):
        strings = data.get(part)
        if isinstance(strings, dict):  # the usage chart's "errors" is a series, not text
            found += [str(v) for v in strings.values()]
    return found


def english_left(html: str, data: list[str]) -> list[str]:
    parser = VisibleText()
    parser.feed(html)
    texts = parser.texts + [s for raw in parser.scripts for s in _strings_for_scripts(raw)]
    left = []
    for text in texts:
        rest = text
        for value in sorted(data, key=len, reverse=True):
            rest = rest.replace(value, " ")
        rest = re.sub(
            r"%\(\w+\)s|/v1/\S*|\S+@\S+|https?://\S+|sk_\S+|[a-z0-9]+(?:[-_.][a-z0-9]+)+", " ", rest
        )
        words = [w for w in re.findall(r"[A-Za-z][A-Za-z_'-]*[A-Za-z]", rest) if w not in KEPT]
        if words:
            left.append(text)
    return left


def test_the_check_catches_an_untranslated_string() -> None:
    """The checker itself: English outside the data is caught, data and kept words are not."""
    html = (
        '<main><h1>用量</h1><p title="Open it">打开</p><p>Acme · API 密钥</p>'
        '<script type="application/json">{"i18n": {"done": "Done"}}</script></main>'
    )
    assert english_left(html, ["Acme"]) == ["Open it", "Done"]


def _msgids() -> set[str]:
    from babel.messages.pofile import read_po

    with PO.open("rb") as handle:
        return {m.id for m in read_po(handle) if m.id and m.string}


@pytest.mark.django_db
def test_every_dashboard_page_is_fully_translated(
    owner, org_admin, client_for, compiled_translations
) -> None:
    from django.utils import timezone

    from tenants.models import UsageRecord
    from tenants.services.api_keys import api_key_create_audited
    from tenants.services.invitations import invitation_create
    from tenants.services.tenants import plans_ensure_defaults

    free, pro = plans_ensure_defaults()
    tenant = owner.tenant
    created = api_key_create_audited(
        tenant=tenant,
        name="ci",
        created_by=owner.user,
        allowed_models=["ocr-lite"],
        access="read",
        expires_at=None,
    )
    invitation = invitation_create(
        tenant=tenant,
        email="guest@example.com",
        role="member",
        invited_by=owner.user,
        actor_role="owner",
        accept_url_for=lambda token: f"/invitations/{token}/",
    )
    for i, status in enumerate(("ok", "error", "cancelled")):
        UsageRecord.objects.create(
            tenant=tenant,
            api_key=created.api_key,
            request_id=f"req-{i}",
            channel="rest",
            model="glm-4.6v-flash",
            status=status,
            error_code="model_not_found" if status == "error" else "",
            prompt_tokens=1200,
            completion_tokens=34,
            total_latency_ms=61_234,
            time_to_first_token_ms=812,
            created_at=timezone.now(),
        )
    data = [
        tenant.name,
        owner.user.email,
        org_admin.user.email,
        "guest@example.com",
        "ci",
        "glm-4.6v-flash",
        "ocr-lite",
        "auto",  # the routing model name
        "model_not_found",
        tenant.slug,
        created.api_key.public_id,
    ]
    t = tenant.pk
    org_pages = [
        reverse("dashboard:overview", args=[t]),
        reverse("dashboard:playground", args=[t]),
        reverse("dashboard:usage", args=[t]),
        reverse("dashboard:requests", args=[t]),
        reverse("dashboard:requests", args=[t]) + "?status=error&start=2001-01-02&end=2001-01-01",
        reverse("dashboard:audit", args=[t]),
        reverse("dashboard:request-detail", args=[t, "req-1"]),
        reverse("dashboard:keys", args=[t]),
        reverse("dashboard:key-revoke", args=[t, created.api_key.public_id]),
        reverse("dashboard:members", args=[t]),
        reverse("dashboard:member-remove", args=[t, org_admin.membership.pk]),
        reverse("dashboard:settings", args=[t]),
        reverse("dashboard:org-create"),
        reverse("dashboard:profile"),
        reverse("dashboard:org-delete", args=[t]),
        reverse("dashboard:invitation-accept", args=[invitation.token]),
        "/no-such-page/",
    ]
    anonymous_pages = [
        "/",
        reverse("dashboard:login"),
        reverse("dashboard:signup"),
        reverse("dashboard:signup") + f"?invitation={invitation.token}",
        reverse("dashboard:password-reset"),
        reverse("dashboard:password-reset-done"),
        reverse("dashboard:password-reset-complete"),
        reverse("dashboard:password-reset-confirm", args=["x", "y"]),
        reverse("dashboard:invitation-accept", args=[invitation.token]),
        reverse("dashboard:invitation-accept", args=["unknown"]),
    ]
    client = client_for(owner)
    member = client_for(org_admin)
    anonymous = Client()
    rendered = [(url, client.get(url, **ZH)) for url in org_pages]
    rendered += [(url, anonymous.get(url, **ZH)) for url in anonymous_pages]
    # Pages after a post: the plan confirmation, forms with errors, a 403.
    rendered += [
        (
            "plan confirm",
            client.post(
                reverse("dashboard:plan-change", args=[t]),
                {"plan": pro.pk if tenant.plan_id != pro.pk else free.pk},
                **ZH,
            ),
        ),
        ("bad key form", client.post(reverse("dashboard:keys", args=[t]), {}, **ZH)),
        ("bad sign-up", anonymous.post(reverse("dashboard:signup"), {"password1": "1"}, **ZH)),
        (
            "bad log-in",
            anonymous.post(
                reverse("dashboard:login"), {"username": "a@b.co", "password": "x"}, **ZH
            ),
        ),
        (
            "admin plan post",
            member.post(reverse("dashboard:plan-change", args=[t]), {"plan": pro.pk}, **ZH),
        ),
    ]
    problems = {}
    for url, response in rendered:
        assert response.status_code in (200, 400, 403, 404, 429), (url, response.status_code)
        left = english_left(response.content.decode(), data)
        if left:
            problems[url] = left
    assert problems == {}, json.dumps(problems, ensure_ascii=False, indent=1)
    assert len(_msgids()) > 250  # the catalogue the pages were rendered with
