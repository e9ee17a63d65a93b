"""The HTTP body of every request, bounded before Django sees it.

Django's ASGI handler reads a request's whole body (into memory, then a temporary file)
before any middleware or view runs, with no size limit and no deadline, and uvicorn has no
setting for either: a client could send 1 GB, or keep a half-sent body open forever, each
holding a connection and a task. ``BodyLimits`` wraps the HTTP application:

- a declared ``Content-Length`` above ``max_bytes`` is answered 413 at once, nothing read;
- a body (chunked or not) that grows past ``max_bytes`` is cut there: 413;
- a body that takes longer than ``total_s`` from the headers, or pauses longer than
  ``idle_s`` between two chunks, is cut: 408.

Either way the answer carries ``Connection: close`` and the connection ends; under ``/v1/``
the body is the OpenAI error object, elsewhere plain text. Django saw a client that went
away (``RequestAborted``), so no view ran. ``max_bytes`` is ``REQUEST_BODY_MAX_BYTES``,
at least the largest plan's chat body; the chat view then applies the caller's own plan
cap (``webplatform.api.chat_completions``). The header deadline is the server's
(``webplatform.server``): a request is not an ASGI request until its headers are complete.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import Any

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


def _declared_length(scope: Scope) -> int | None:
    headers: Iterable[tuple[bytes, bytes]] = scope.get("headers", [])  # type: ignore[assignment]
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def send_refusal(send: ASGISendCallable, *, status: int, path: str) -> None:
    code, message = _ERRORS[status]
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
    ) -> None:
        """Each limit not given is read from its setting at every request
        (``REQUEST_BODY_MAX_BYTES``, ``REQUEST_BODY_TIMEOUT_SECONDS``,
        ``REQUEST_BODY_IDLE_SECONDS``)."""
        self.app = app
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
        path = scope.get("path", "")
        declared = _declared_length(scope)
        if declared is not None and declared > max_bytes:
            await send_refusal(send, status=413, path=path)
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
                if received > max_bytes:
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
        if cut is not None and not started:
            await send_refusal(send, status=cut, path=path)
