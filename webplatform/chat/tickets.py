"""Short-lived, single-use websocket tickets, so browsers never put a long-lived key in a URL.

``POST /v1/chat/tickets`` (API key auth) returns a random ticket that stands for the key for
``CHAT_TICKET_SECONDS``; the websocket handshake redeems it once with ``?ticket=...``. Only
the key's database id is stored with the ticket; redemption checks revocation and expiry
again.
"""

from __future__ import annotations

import secrets

from django.conf import settings
from django.core.cache import cache

from tenants.principals import ApiPrincipal
from tenants.selectors.accounts import user_get
from tenants.selectors.tenants import member_principal_get, tenant_get
from tenants.services.api_keys import api_key_principal_by_id

_PREFIX = "wsticket:"


def _ttl() -> int:
    return int(getattr(settings, "CHAT_TICKET_SECONDS", 60))


def chat_ticket_issue(*, principal: ApiPrincipal) -> tuple[str, int]:
    """Return ``(ticket, seconds it is valid)`` for this principal."""
    ticket = secrets.token_urlsafe(32)
    payload = {
        "api_key_id": principal.api_key.pk if principal.api_key is not None else None,
        "tenant_id": principal.tenant_id,
        "user_id": principal.user.pk if principal.user is not None else None,
    }
    cache.set(_PREFIX + ticket, payload, timeout=_ttl())
    return ticket, _ttl()


def chat_ticket_redeem(*, ticket: str) -> ApiPrincipal | None:
    """The principal a ticket stands for, once; ``None`` if unknown, used or expired."""
    if not ticket or len(ticket) > 128:
        return None
    key = _PREFIX + ticket
    payload = cache.get(key)
    # ``delete`` reports whether this caller removed it: of two racing redeemers one wins.
    if payload is None or not cache.delete(key):
        return None
    if payload["api_key_id"] is not None:
        return api_key_principal_by_id(api_key_id=payload["api_key_id"])
    # Either may be gone (or the user deactivated) since the ticket was issued: then the
    # ticket is worth nothing (``None``, refused as invalid), never a crash of the handshake.
    tenant = tenant_get(tenant_id=payload["tenant_id"])
    user = user_get(user_id=payload["user_id"])
    if tenant is None or user is None or not user.is_active:
        return None
    return member_principal_get(tenant=tenant, user=user)
