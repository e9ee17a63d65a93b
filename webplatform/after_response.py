"""Work a request owes after its response: run once the client has the last byte.

A served answer's bookkeeping that the client does not wait for (the usage record and the
content log: two database round trips and ~2.5 ms of a tiny-model request on this
project's CPU, docs/benchmarks.md) is written after the response instead of before it.
``AfterResponse`` wraps the HTTP application: it gives every request's scope a list, a view
appends coroutine functions to it (``after_response_deferral``), and they run, in order,
once the wrapped application has returned, that is after Django sent the whole response
and closed it. They run inside the request's ASGI call, so the server still counts the
request as in flight: a graceful shutdown waits for them as for any request.

Without the wrapper (Django's test client, a websocket consumer) there is no list and the
caller does the work before answering, as before. A callback that fails is logged; the
next one still runs. What is deferred must not change what the next request of the same
client sees: quota leases (concurrency, tokens) are settled before the response.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger(__name__)

SCOPE_KEY = "webplatform.after_response"

AfterCallback = Callable[[], Awaitable[None]]
# Takes the work; False when it is too late to defer it (the request's callbacks already
# ran): the caller then does it at once.
Deferral = Callable[[AfterCallback], bool]


_pending = 0  # callbacks deferred and not yet run, in this process


def after_response_pending() -> int:
    """How many deferred callbacks this process has not run yet (0 when it is idle): a test
    that reads what a response's work wrote waits for 0."""
    return _pending


class _Callbacks:
    """One request's deferred work; closed once it ran, after which nothing is taken."""

    def __init__(self) -> None:
        self.pending: list[AfterCallback] = []
        self.closed = False

    def defer(self, callback: AfterCallback) -> bool:
        global _pending
        if self.closed:
            return False
        self.pending.append(callback)
        _pending += 1
        return True

    async def run(self, path: str) -> None:
        global _pending
        while self.pending:
            callback = self.pending.pop(0)
            try:
                await callback()
            except Exception:
                logger.exception("after-response work of %s failed", path)
            finally:
                _pending -= 1
        self.closed = True  # no await since the list was found empty: nothing slips in


class AfterResponse:
    """ASGI middleware: runs each HTTP request's deferred callbacks after its response."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        callbacks = _Callbacks()
        scope[SCOPE_KEY] = callbacks
        try:
            await self.app(scope, receive, send)
        finally:
            # Also after an exception or a cancellation: what was deferred was owed.
            await callbacks.run(scope.get("path", ""))


def after_response_deferral(request: Any) -> Deferral | None:
    """How to defer work of this Django request until after its response, or None when it
    cannot be (no ``AfterResponse`` around the application): then do it before answering."""
    scope = getattr(request, "scope", None)
    callbacks = scope.get(SCOPE_KEY) if isinstance(scope, dict) else None
    return callbacks.defer if isinstance(callbacks, _Callbacks) else None
