"""The HTTP body of every request, bounded before Django sees it.

Django's ASGI handler reads a request's whole body (into memory, then a temporary file)
before any middleware or view runs, with no size limit and no deadline, and uvicorn has no
setting for either: a client could send 1 GB, or keep a half-sent body open forever, each
holding a connection and a task. ``BodyLimits`` wraps the HTTP application:

- a declared ``Content-Length`` above the cap is answered 413 at once, nothing read;
- a body (chunked or not) that grows past the cap is cut there: 413;
- a body that takes longer than ``total_s`` from the headers, or pauses longer than
  ``idle_s`` between two chunks, is cut: 408.

The cap is ``max_bytes`` (``REQUEST_BODY_MAX_BYTES``, at least the largest plan's chat
body), or the caller's own where ``caller_cap`` knows a smaller one: for
``POST /v1/chat/completions`` the plan's (``webplatform.api.body_cap``), looked up from the
API key before the body is read when the body may exceed the smallest plan's cap. Either
way the answer carries ``Connection: close`` and the connection ends; under ``/v1/`` the
body is the OpenAI error object, elsewhere plain text. Django saw a client that went away
(``RequestAborted``), so no view ran. The chat view checks the plan cap again (a body under
it passes unchanged). The header deadline is the server's (``webplatform.server``): a
request is not an ASGI request until its headers are complete.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from asgiref.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from django.conf import settings

ASGIApp = Any

_ERRORS = {
    408: (
        "request_timeout",
        "The request body did not arrive in time; the connection was closed.",
    ),
    413: (
        "request_too_large",
        "The request body is larger than this server accepts.",
    ),
}


@dataclass(frozen=True, slots=True)
class CallerRefusal:
    """How a refusal at a caller's own cap reads: its message, and headers to add; a 413
    ``request_too_large`` unless the caller is refused for another reason (a 401 for a
    caller that does not authenticate: what the view would answer, without its body)."""

    message: str
    headers: tuple[tuple[bytes, bytes], ...] = ()
    status: int = 413
    code: str = "request_too_large"


class CallerCap(Protocol):
    """A cap on one request's body narrower than ``max_bytes``, from who is calling."""

    @property
    def limit(self) -> int: ...

    async def refused(self, *, size: int | None) -> CallerRefusal:
        """Called once when the body is refused at ``limit`` (``size``: the declared
        length, None when the body grew past it)."""
        ...


# The caller's cap for a request (its scope and declared Content-Length), or None.
CallerCapLookup = Callable[[Scope, int | None], Awaitable[CallerCap | None]]


def app_path(scope: Scope) -> str:
    """The request's path below the application's mount point (``root_path``), as Django's
    URLs see it: what tells an API request (``/v1/``) from a page."""
    path = str(scope.get("path", ""))
    root = str(scope.get("root_path", ""))
    return path[len(root) :] if root and path.startswith(root) else path


def _declared_length(scope: Scope) -> int | None:
    headers: Iterable[tuple[bytes, bytes]] = scope.get("headers", [])  # type: ignore[assignment]
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def send_refusal(
    send: ASGISendCallable,
    *,
    status: int,
    path: str,
    message: str | None = None,
    headers: Iterable[tuple[bytes, bytes]] = (),
    code: str | None = None,
) -> None:
    default_code, default_message = _ERRORS.get(status, ("", ""))
    code = code or default_code
    message = message or default_message
    if path.startswith("/v1/"):
        body = json.dumps(
            {
                "error": {
                    "message": message,
                    "type": "invalid_request_error",
                    "param": None,
                    "code": code,
                }
            }
        ).encode()
        content_type = b"application/json"
    else:
        body, content_type = message.encode(), b"text/plain; charset=utf-8"
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                *headers,
            ],
            "trailers": False,
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


class BodyLimits:
    """ASGI middleware: see the module's docstring."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int | None = None,
        total_s: float | None = None,
        idle_s: float | None = None,
        caller_cap: CallerCapLookup | None = None,
    ) -> None:
        """Each limit not given is read from its setting at every request
        (``REQUEST_BODY_MAX_BYTES``, ``REQUEST_BODY_TIMEOUT_SECONDS``,
        ``REQUEST_BODY_IDLE_SECONDS``). ``caller_cap`` is awaited for every request
        declaring at most ``max_bytes``, before its body is read: keep it cheap where the
        caller cannot matter."""
        self.app = app
        self._caller_cap = caller_cap
        self._max_bytes = max_bytes
        self._total_s = total_s
        self._idle_s = idle_s

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self._max_bytes or settings.REQUEST_BODY_MAX_BYTES
        total_s = self._total_s or settings.REQUEST_BODY_TIMEOUT_SECONDS
        idle_s = self._idle_s or settings.REQUEST_BODY_IDLE_SECONDS
        path = app_path(scope)
        declared = _declared_length(scope)
        if declared is not None and declared > max_bytes:
            await send_refusal(send, status=413, path=path)
            return
        caller = await self._caller_cap(scope, declared) if self._caller_cap else None
        if caller is not None and caller.limit >= max_bytes:
            caller = None
        limit = max_bytes if caller is None else caller.limit

        async def refuse_too_large(size: int | None) -> None:
            if caller is None:
                await send_refusal(send, status=413, path=path)
                return
            refusal = await caller.refused(size=size)
            await send_refusal(
                send,
                status=refusal.status,
                path=path,
                message=refusal.message,
                headers=refusal.headers,
                code=refusal.code,
            )

        if declared is not None and declared > limit:
            await refuse_too_large(declared)
            return

        loop = asyncio.get_running_loop()
        deadline = loop.time() + total_s
        received = 0
        body_done = False
        cut: int | None = None
        started = False

        async def limited_receive() -> Any:
            nonlocal received, body_done, cut
            if body_done or cut is not None:
                return await receive()  # the app listening for the client to go away
            timeout = min(idle_s, deadline - loop.time())
            try:
                message = await asyncio.wait_for(receive(), timeout=max(timeout, 0.0))
            except TimeoutError:
                cut = 408
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    cut = 413
                    return {"type": "http.disconnect"}
                body_done = not message.get("more_body", False)
            return message

        async def tracking_send(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, limited_receive, tracking_send)
        if cut == 413 and not started:
            await refuse_too_large(None)
        elif cut is not None and not started:
            await send_refusal(send, status=cut, path=path)
