"""The middleware of every HTTP request: its id (``RequestIdMiddleware``), the static files
(``StaticFilesMiddleware``), and Django's own middleware made cheap on the event loop.

Every HTTP request gets one id, made here before any view runs, and every response carries
it as ``x-request-id``, errors included, so a client can always quote one. A view that
starts a completion (``POST /v1/chat/completions``) gives the same id to the request path:
the usage record and the worker know the request by it (``request_id_of``).

Ids come from ``inference.protocol.new_request_id``; the websocket chat, which has no HTTP
request per answer, takes one from there for each ``message`` frame.

Django runs an old-style middleware (``MiddlewareMixin``) under ASGI by sending each of its
hooks through ``sync_to_async`` to the request's sync thread and back: with Django's nine in
``settings.MIDDLEWARE`` that was 17 thread hand-offs on every API request, CPU the engine
lacks under load (docs/benchmarks.md, "Platform path"). So ``settings.MIDDLEWARE`` names
the subclasses below:

- ``OnEventLoop``: the middleware whose hooks only read the request and set headers (CSP,
  locale, common) run them on the event loop, no hand-off;
- ``BrowserOnly``: the middleware of the browser's pages (sessions, authentication by
  session, messages) do nothing under ``/v1/``, whose views authenticate by API key;
  elsewhere they run as Django runs them (a session is read and saved in the database,
  which must not happen on the event loop).

Django's security, CSRF and clickjacking middleware stay Django's own in
``settings.MIDDLEWARE``: the deployment checks (``security.W001``-``W003``, and every check
of the security middleware's settings, HSTS, SSL redirect...) look for their exact names.
The ASGI application is built by ``PlatformAsgiHandler``, which loads the subclasses of
``ON_EVENT_LOOP`` in their places: the same hooks, run on the event loop (they only read
the request and set headers and cookies; ``CSRF_USE_SESSIONS`` is off, so CSRF reads no
session). That was the last 6 hand-offs of an API request, each a trip to the request's
sync thread and back (~1-1.5 ms at one client, docs/benchmarks.md). That thread is lent
from a pool (``webplatform.request_threads``) rather than made and joined for each request.

Under WSGI (and Django's test ``Client``) all of them run as Django's own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import (
    ThreadSensitiveContext,
    iscoroutinefunction,
    markcoroutinefunction,
    sync_to_async,
)
from csp.middleware import CSPMiddleware as DjangoCsp
from django.conf import settings
from django.contrib.auth.middleware import AuthenticationMiddleware as DjangoAuthentication
from django.contrib.messages.middleware import MessageMiddleware as DjangoMessages
from django.contrib.sessions.middleware import SessionMiddleware as DjangoSessions
from django.core.handlers.asgi import ASGIHandler
from django.http import HttpRequest, HttpResponseBase
from django.middleware.clickjacking import XFrameOptionsMiddleware as DjangoXFrame
from django.middleware.common import CommonMiddleware as DjangoCommon
from django.middleware.csrf import CsrfViewMiddleware as DjangoCsrf
from django.middleware.locale import LocaleMiddleware as DjangoLocale
from django.middleware.security import SecurityMiddleware as DjangoSecurity
from rest_framework.request import Request
from whitenoise.middleware import WhiteNoiseMiddleware

from inference.protocol import new_request_id
from webplatform.api.errors import API_PATH_PREFIX
from webplatform.log_context import log_context_start
from webplatform.request_threads import RequestThreads

REQUEST_ID_HEADER = "x-request-id"
# The attribute of Django's HttpRequest that holds the id (read it with request_id_of).
_ATTRIBUTE = "platform_request_id"


def request_id_of(request: HttpRequest | Request) -> str:
    """The id of this HTTP request (a DRF ``Request`` reads its Django request's)."""
    http_request = request._request if isinstance(request, Request) else request
    request_id: str = getattr(http_request, _ATTRIBUTE)
    return request_id


class RequestIdMiddleware:
    sync_capable = True
    async_capable = True

    def __init__(
        self,
        get_response: Callable[[HttpRequest], HttpResponseBase]
        | Callable[[HttpRequest], Awaitable[HttpResponseBase]],
    ) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        request_id = new_request_id()
        setattr(request, _ATTRIBUTE, request_id)
        log_context_start(request_id=request_id)  # every log line of the request names it
        if self.is_async:
            return self._acall(request)
        response = self.get_response(request)
        assert isinstance(response, HttpResponseBase)
        return self._stamp(request, response)

    async def _acall(self, request: HttpRequest) -> HttpResponseBase:
        response = self.get_response(request)
        assert not isinstance(response, HttpResponseBase)
        return self._stamp(request, await response)

    @staticmethod
    def _stamp(request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
        if REQUEST_ID_HEADER not in response:
            response[REQUEST_ID_HEADER] = request_id_of(request)
        return response


class StaticFilesMiddleware(WhiteNoiseMiddleware):
    """WhiteNoise, async-capable: under ASGI a request that is not for a static file goes
    on to the next middleware on the event loop.

    WhiteNoise's own middleware is sync-only, and one sync-only middleware in the stack makes
    Django run it in a thread and the rest of the stack, view included, back on the event
    loop from that thread: two thread hand-offs each way on every API request (about 1-2
    ms of waiting at one client, docs/benchmarks.md "Platform path"). Serving a file stays
    WhiteNoise's, in a thread (it stats and opens files).
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        super().__init__(get_response)
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self._acall(request)
        return super().__call__(request)

    async def _acall(self, request: HttpRequest) -> HttpResponseBase:
        if self.autorefresh:  # development: looks at the disk
            static_file = await sync_to_async(self.find_file)(request.path_info)
        else:
            static_file = self.files.get(request.path_info)
        if static_file is not None:
            response: HttpResponseBase = await sync_to_async(self.serve)(static_file, request)
            return response
        response = await self.get_response(request)
        return response


class OnEventLoop:
    """Mixed into a ``MiddlewareMixin`` whose ``process_request`` and ``process_response``
    neither block nor touch the database: under ASGI they run on the event loop, where
    Django would hand each of them to the sync thread and back."""

    get_response: Any  # MiddlewareMixin's: in async mode, a coroutine function

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        response: HttpResponseBase | None = None
        process_request = getattr(self, "process_request", None)
        if process_request is not None:
            response = process_request(request)
        response = response or await self.get_response(request)
        process_response = getattr(self, "process_response", None)
        if process_response is not None:
            response = process_response(request, response)
        return response


_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


def _is_api_request(request: HttpRequest) -> bool:
    return request.path_info.startswith(API_PATH_PREFIX)


class BrowserOnly:
    """Mixed into a ``MiddlewareMixin`` that serves the browser's pages: under ASGI a
    request under ``/v1/`` goes past it untouched; any other runs it as Django does."""

    get_response: Any  # MiddlewareMixin's: in async mode, a coroutine function

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        if _is_api_request(request):
            response: HttpResponseBase = await self.get_response(request)
            return response
        handled: HttpResponseBase = await super().__acall__(request)  # type: ignore[misc]
        return handled


class CSPMiddleware(OnEventLoop, DjangoCsp):
    pass


class LocaleMiddleware(OnEventLoop, DjangoLocale):
    pass


class CommonMiddleware(OnEventLoop, DjangoCommon):
    pass


class SecurityMiddleware(OnEventLoop, DjangoSecurity):
    pass


class XFrameOptionsMiddleware(OnEventLoop, DjangoXFrame):
    pass


class CsrfViewMiddleware(OnEventLoop, DjangoCsrf):
    async def process_view(  # type: ignore[override]
        self,
        request: HttpRequest,
        callback: Callable[..., Any],
        callback_args: tuple[Any, ...],
        callback_kwargs: dict[str, Any],
    ) -> HttpResponseBase | None:
        # A coroutine function: Django's handler awaits it on the event loop. A page's
        # unsafe request still goes to a thread, as Django sends it: checking its token
        # reads request.POST, which parses a form body (a multipart one to temporary
        # files) that must not stall the loop. API views are exempt and read nothing.
        if request.method not in _SAFE_METHODS and not _is_api_request(request):
            view = sync_to_async(super().process_view, thread_sensitive=True)
            response: HttpResponseBase | None = await view(
                request, callback, callback_args, callback_kwargs
            )
            return response
        return super().process_view(request, callback, callback_args, callback_kwargs)


# Django's classes (by the names settings.MIDDLEWARE and the checks use) -> what the ASGI
# handler loads instead.
ON_EVENT_LOOP = {
    "django.middleware.security.SecurityMiddleware": ("webplatform.middleware.SecurityMiddleware"),
    "django.middleware.csrf.CsrfViewMiddleware": "webplatform.middleware.CsrfViewMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware": (
        "webplatform.middleware.XFrameOptionsMiddleware"
    ),
}


class PlatformAsgiHandler(ASGIHandler):
    """Django's ASGI handler, loading the ``ON_EVENT_LOOP`` subclasses in place of Django's
    security, CSRF and clickjacking middleware (module docstring), and running each request's
    thread-sensitive work on a thread lent by ``threads`` (``webplatform.request_threads``)
    instead of one made and joined for the request."""

    def __init__(self, threads: RequestThreads | None = None) -> None:
        super().__init__()
        self.threads = threads if threads is not None else RequestThreads()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # as Django's handler: websockets go to Channels
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        executor = self.threads.lend()
        try:
            async with ThreadSensitiveContext(executor=executor):
                await self.handle(scope, receive, send)
        finally:
            executor.give_back()

    def load_middleware(self, is_async: bool = False) -> None:
        # Django reads the list from settings.MIDDLEWARE only: given the substituted list
        # while it loads (at start-up, before any request), the configured one after.
        configured = settings.MIDDLEWARE
        settings.MIDDLEWARE = [ON_EVENT_LOOP.get(path, path) for path in configured]
        try:
            super().load_middleware(is_async)
        finally:
            settings.MIDDLEWARE = configured


class SessionMiddleware(BrowserOnly, DjangoSessions):
    pass


class AuthenticationMiddleware(BrowserOnly, DjangoAuthentication):
    pass


class MessageMiddleware(BrowserOnly, DjangoMessages):
    pass


__all__ = [
    "REQUEST_ID_HEADER",
    "AuthenticationMiddleware",
    "BrowserOnly",
    "CSPMiddleware",
    "CommonMiddleware",
    "CsrfViewMiddleware",
    "LocaleMiddleware",
    "MessageMiddleware",
    "ON_EVENT_LOOP",
    "OnEventLoop",
    "PlatformAsgiHandler",
    "RequestIdMiddleware",
    "SecurityMiddleware",
    "SessionMiddleware",
    "StaticFilesMiddleware",
    "XFrameOptionsMiddleware",
    "request_id_of",
]
