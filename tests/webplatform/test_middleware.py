"""The middleware under ASGI: an API request hands only Django's security, CSRF and
clickjacking hooks to a thread (the deployment checks want those by name), and the
browser's pages keep their sessions, CSRF cookie and headers."""

from __future__ import annotations

from typing import Any

import pytest
from asgiref.sync import SyncToAsync, async_to_sync
from django.test import AsyncClient
from django.urls import reverse

from tests.factories import api_key_for


@pytest.fixture
def handed_to_threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The qualified names of the callables sent through ``sync_to_async`` meanwhile."""
    names: list[str] = []
    original = SyncToAsync.__init__

    def recording(self: SyncToAsync, func: Any, *args: Any, **kwargs: Any) -> None:
        names.append(getattr(func, "__qualname__", repr(func)))
        original(self, func, *args, **kwargs)

    monkeypatch.setattr(SyncToAsync, "__init__", recording)
    return names


def _get(path: str, **headers: str) -> Any:
    """``path`` through Django's ASGI handler (the middleware in its async mode)."""
    return async_to_sync(AsyncClient().get)(path, headers=headers)


@pytest.mark.django_db
def test_an_api_request_hands_only_djangos_own_middleware_to_a_thread(owner, handed_to_threads):  # type: ignore[no-untyped-def]
    key = api_key_for(owner.tenant).raw_key
    response = _get("/v1/models", authorization=f"Bearer {key}")
    assert response.status_code == 200
    assert "x-request-id" in response
    assert response["X-Content-Type-Options"] == "nosniff"  # SecurityMiddleware ran
    assert response["X-Frame-Options"] == "DENY"  # XFrameOptionsMiddleware ran
    assert not response.cookies  # no session, no CSRF cookie
    hooks = sorted(name for name in handed_to_threads if "Middleware." in name)
    assert hooks == [  # was 17 with Django's classes for all nine
        "CsrfViewMiddleware.process_request",
        "CsrfViewMiddleware.process_response",
        "CsrfViewMiddleware.process_view",
        "SecurityMiddleware.process_request",
        "SecurityMiddleware.process_response",
        "XFrameOptionsMiddleware.process_response",
    ]


@pytest.mark.django_db
def test_a_page_keeps_its_csrf_cookie_and_headers(handed_to_threads):  # type: ignore[no-untyped-def]
    response = _get(reverse("dashboard:login"), **{"accept-language": "zh-hans"})
    assert response.status_code == 200
    assert "csrftoken" in response.cookies
    assert response["Content-Language"] == "zh-hans"  # LocaleMiddleware ran
    assert response["X-Frame-Options"] == "DENY"
    assert "Content-Security-Policy" in response
    # The browser's middleware still runs in the sync thread there (sessions touch the
    # database); the header-only ones do not.
    hooks = [name for name in handed_to_threads if "Middleware." in name]
    assert "CsrfViewMiddleware.process_view" in hooks
    assert "SessionMiddleware.process_request" in hooks
    assert not any(name.startswith(("LocaleMiddleware.", "CommonMiddleware.")) for name in hooks)
