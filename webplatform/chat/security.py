"""The middleware stack every websocket connection passes: origin check, then sessions."""

from __future__ import annotations

from channels.auth import AuthMiddlewareStack
from channels.security.websocket import AllowedHostsOriginValidator


def websocket_stack(inner):  # type: ignore[no-untyped-def]
    return AllowedHostsOriginValidator(AuthMiddlewareStack(inner))
