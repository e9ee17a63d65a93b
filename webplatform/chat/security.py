"""The middleware stack every websocket connection passes: origin check, then sessions.

Browsers always send ``Origin``; a connection that carries one must come from an allowed
host (cross-site websocket hijacking would otherwise ride on the session cookie). Programs
(SDKs, the ``websockets`` client) send none: they are let through, and the consumer then
accepts only credentials a browser cannot attach by itself (a Bearer header or a ticket),
never the session cookie alone.
"""

from __future__ import annotations

from typing import Any

from channels.auth import AuthMiddlewareStack
from channels.security.websocket import AllowedHostsOriginValidator


class OriginCheck:
    """Check ``Origin`` when there is one; record in the scope whether there was."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        # Reuse Channels' host matching (ALLOWED_HOSTS patterns, ports, subdomains).
        self.validator = AllowedHostsOriginValidator(inner)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        has_origin = any(name == b"origin" for name, _ in scope.get("headers", []))
        scope = {**scope, "browser_origin": has_origin}
        if has_origin:
            return await self.validator(scope, receive, send)
        return await self.inner(scope, receive, send)


def websocket_stack(inner: Any) -> Any:
    return OriginCheck(AuthMiddlewareStack(inner))
