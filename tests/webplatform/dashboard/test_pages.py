"""Playground configuration, translations and the language switcher."""

from __future__ import annotations

import json

import pytest
from django.urls import reverse


@pytest.mark.django_db
def test_playground_page_carries_the_websocket_path_models_and_limits(client_for, teammate) -> None:
    response = client_for(teammate).get(reverse("dashboard:playground", args=[teammate.tenant.pk]))
    html = response.content.decode()
    start = html.index(">", html.index('id="playground-config"')) + 1
    config = json.loads(html[start : html.index("</script>", start)])
    assert config["ws_path"] == f"/ws/chat/?tenant={teammate.tenant.pk}"
    assert config["models"] == ["glm-4.6v-flash", "ocr-lite"]
    assert config["max_image_bytes"] == 5 * 1024 * 1024
    assert "image_too_large" in config["errors"]


@pytest.mark.django_db
def test_pages_speak_simplified_chinese_to_a_chinese_browser(
    client_for, owner, compiled_translations
) -> None:
    client = client_for(owner)
    page = client.get(
        reverse("dashboard:overview", args=[owner.tenant.pk]), HTTP_ACCEPT_LANGUAGE="zh-CN,zh;q=0.9"
    )
    html = page.content.decode()
    assert '<html lang="zh-hans">' in html
    assert "用量" in html and "Usage</a>" not in html
    login = client_for(None).get(reverse("dashboard:login"), HTTP_ACCEPT_LANGUAGE="zh-hans")
    assert "登录" in login.content.decode()


@pytest.mark.django_db
def test_the_language_switcher_overrides_the_browser(
    client_for, owner, compiled_translations
) -> None:
    client = client_for(owner)
    url = reverse("dashboard:overview", args=[owner.tenant.pk])
    response = client.post(reverse("dashboard:set_language"), {"language": "zh-hans", "next": url})
    assert response["Location"] == url
    html = client.get(url, HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert "用量" in html
