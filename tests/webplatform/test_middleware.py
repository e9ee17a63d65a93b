"""The middleware under the platform's ASGI handler: an API request hands no middleware hook
to a thread (Django's security, CSRF and clickjacking middleware, configured by name for
the deployment checks, run as event-loop subclasses), and the browser's pages keep their
sessions, CSRF protection, cookie and headers."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from asgiref.sync import SyncToAsync, async_to_sync
from django.urls import reverse

from tests.factories import api_key_for
from webplatform.middleware import ON_EVENT_LOOP, PlatformAsgiHandler


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


def _request(method: str, path: str, **kwargs: Any) -> httpx.Response:
    """``path`` through the handler ``webplatform.asgi`` serves (the middleware in its async
    mode, with the event-loop subclasses), over httpx's ASGI transport."""

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=PlatformAsgiHandler())
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            return await c.request(method, path, **kwargs)

    return async_to_sync(send)()


def _get(path: str, **headers: str) -> httpx.Response:
    return _request("GET", path, headers=headers)


@pytest.mark.django_db(transaction=True)  # the handler's threads see what the test wrote
def test_an_api_request_hands_no_middleware_hook_to_a_thread(owner, handed_to_threads):  # type: ignore[no-untyped-def]
    key = api_key_for(owner.tenant).raw_key
    response = _get("/v1/models", authorization=f"Bearer {key}")
    assert response.status_code == 200
    assert "x-request-id" in response.headers
    assert response.headers["X-Content-Type-Options"] == "nosniff"  # SecurityMiddleware ran
    assert response.headers["X-Frame-Options"] == "DENY"  # XFrameOptionsMiddleware ran
    assert not response.cookies  # no session, no CSRF cookie
    hooks = sorted(name for name in handed_to_threads if "Middleware." in name)
    assert hooks == []  # was 17 with Django's classes for all nine, then 6


@pytest.mark.django_db(transaction=True)
def test_a_page_keeps_its_csrf_cookie_and_headers(handed_to_threads):  # type: ignore[no-untyped-def]
    response = _get(reverse("dashboard:login"), **{"accept-language": "zh-hans"})
    assert response.status_code == 200
    assert "csrftoken" in response.cookies
    assert response.headers["Content-Language"] == "zh-hans"  # LocaleMiddleware ran
    assert response.headers["X-Frame-Options"] == "DENY"
    assert "Content-Security-Policy" in response.headers
    # The browser's middleware still runs in the sync thread there (sessions touch the
    # database); the header-only ones do not.
    hooks = [name for name in handed_to_threads if "Middleware." in name]
    assert "SessionMiddleware.process_request" in hooks
    assert not any(
        name.startswith(("LocaleMiddleware.", "CommonMiddleware.", "CsrfViewMiddleware."))
        for name in hooks
    )


@pytest.mark.django_db(transaction=True)
def test_csrf_still_refuses_a_page_post_without_its_token(handed_to_threads):  # type: ignore[no-untyped-def]
    response = _request("POST", reverse("dashboard:login"), data={"username": "a"})
    assert response.status_code == 403  # CsrfViewMiddleware.process_view
    # Its check reads the form body: in a thread, never on the event loop.
    assert any(name.endswith("process_view") for name in handed_to_threads)


def test_the_configured_middleware_keeps_djangos_names_for_the_deployment_checks(settings):
    from django.core.checks.security.base import (
        check_security_middleware,
        check_xframe_options_middleware,
    )
    from django.core.checks.security.csrf import check_csrf_middleware

    for path in ON_EVENT_LOOP:
        assert path in settings.MIDDLEWARE
    assert not check_security_middleware(None)
    assert not check_csrf_middleware(None)
    assert not check_xframe_options_middleware(None)
    PlatformAsgiHandler()  # loading swaps the classes in for itself only
    assert not set(ON_EVENT_LOOP.values()) & set(settings.MIDDLEWARE)
