"""The middleware stack every websocket connection passes: origin check, then sessions.

Browsers always send ``Origin``; a connection that carries one must come from an allowed
host (cross-site websocket hijacking would otherwise ride on the session cookie). Programs
(SDKs, the ``websockets`` client) send none: they are let through, and the consumer then
accepts only credentials a browser cannot attach by itself (a Bearer header or a ticket),
never the session cookie alone.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from channels.auth import AuthMiddlewareStack
from channels.security.websocket import AllowedHostsOriginValidator


class OriginCheck:
    """Check ``Origin`` when there is one; record in the scope whether there was."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        # Reuse Channels' host matching (ALLOWED_HOSTS patterns, ports, subdomains).
        self.validator = AllowedHostsOriginValidator(inner)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        origins = [value for name, value in scope.get("headers", []) if name == b"origin"]
        scope = {**scope, "browser_origin": bool(origins)}
        if origins and not self.validator.valid_origin(urlparse(origins[-1].decode("latin1"))):
            return await _refuse_handshake(receive, send)
        return await self.inner(scope, receive, send)


async def _refuse_handshake(receive: Any, send: Any) -> None:
    """Answer the handshake with HTTP 403, as Channels' ``WebsocketDenier`` does, without
    starting a consumer: a refused connection never subscribes to the channel layer."""
    message = await receive()
    if message["type"] == "websocket.connect":
        await send({"type": "websocket.close"})


def websocket_stack(inner: Any) -> Any:
    return OriginCheck(AuthMiddlewareStack(inner))
