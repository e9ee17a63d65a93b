"""The request-body cap that depends on the caller: the plan's, applied while the body streams.

``POST /v1/chat/completions`` accepts, per caller, the text at its cap and the plan's
images at their largest (``chat_body_cap``: one formula, used by the view when it reads the
body and by ``BodyLimits``, ``webplatform.asgi_limits``, before Django buffers it). The
view alone would see the body only after Django's ASGI handler had read all of it, up to
the global ``REQUEST_BODY_MAX_BYTES``; ``caller_body_cap`` lets ``BodyLimits`` stop at the
caller's own cap instead.

Cost: a request whose declared ``Content-Length`` is at most ``chat_body_cap_floor()``
(the cap of a plan allowing images of 0 bytes: 2.5 MiB with the default settings, which is
Django's ``DATA_UPLOAD_MAX_MEMORY_SIZE``) fits every caller's cap, so it costs a comparison;
only a chunked body or a larger declared one on a capped route costs one more
``api_key_authenticate`` (one cache read and an HMAC; on a cache miss one SELECT) before
its body is read. The view authenticates again as usual.

A caller that does not authenticate (no key, an unknown, revoked or expired one) has no
plan, and its request can only end in the view's 401: its body is read up to the floor and
no further (a body over it, declared or grown, gets that 401 at once, with the view's
message, ``WWW-Authenticate`` and an ``x-request-id``), so a client without a valid key
cannot make the server read 128 MiB. A cache outage during the lookup leaves the global
cap, and the view then answers its 503 as without this module.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

from asgiref.typing import Scope
from channels.db import database_sync_to_async
from django.conf import settings
from django.db import DatabaseError
from django.urls import Resolver404, resolve

from inference.protocol import new_request_id
from tenants.errors import ApplicationError
from tenants.models import UsageRecord
from tenants.outages import StoreUnavailable
from tenants.principals import ApiPrincipal
from tenants.services.api_keys import api_key_authenticate
from tenants.services.usage import usage_record_create
from webplatform.api.errors import MISSING_KEY_MESSAGE
from webplatform.api.request_body import too_large
from webplatform.asgi_limits import CallerRefusal, app_path
from webplatform.middleware import REQUEST_ID_HEADER

logger = logging.getLogger(__name__)

# The routes whose body cap is ``chat_body_cap`` of the caller's plan (URL names).
_PLAN_CAPPED_ROUTES = frozenset({"api-chat-completions"})


def chat_body_cap(*, max_image_bytes: int) -> int:
    """The largest chat request body for a plan whose images may be ``max_image_bytes``
    each, text and images counted apart: the text at its cap (``CHAT_MAX_TEXT_CHARS``, each
    character at its longest JSON escape, plus room for the JSON around it) and
    ``IMAGE_MAX_PER_REQUEST`` images at their largest, base64-encoded. Never below Django's
    ``DATA_UPLOAD_MAX_MEMORY_SIZE`` (2.5 MB by default, far below one allowed image), which
    the view replaces with this cap."""
    per_image = math.ceil(max_image_bytes / 3) * 4 + 1024
    text_bytes = 6 * settings.CHAT_MAX_TEXT_CHARS + 64 * 1024
    return max(
        settings.IMAGE_MAX_PER_REQUEST * per_image + text_bytes,
        settings.DATA_UPLOAD_MAX_MEMORY_SIZE or 0,
    )


def chat_body_cap_floor() -> int:
    """The smallest ``chat_body_cap`` any caller can have (the cap grows with
    ``max_image_bytes``, a positive integer field): a body this long or shorter fits every
    plan, so its caller need not be looked up."""
    return chat_body_cap(max_image_bytes=0)


def principal_body_cap(principal: ApiPrincipal) -> int:
    """The largest chat request body this caller may send (``chat_body_cap`` of its plan)."""
    return chat_body_cap(max_image_bytes=principal.limits.max_image_bytes)


@dataclass(frozen=True, slots=True)
class PlanBodyCap:
    """A caller's plan cap, for ``BodyLimits`` (``webplatform.asgi_limits.CallerCap``)."""

    limit: int
    principal: ApiPrincipal
    started: float  # time.monotonic() when the request's headers were in

    async def refused(self, *, size: int | None) -> CallerRefusal:
        """The 413 the view would have given: its message, an ``x-request-id``, and the
        refusal's usage record (as ``webplatform.api.rejections`` records the view's)."""
        request_id = new_request_id()
        await database_sync_to_async(_refusal_record)(
            principal=self.principal,
            request_id=request_id,
            latency_ms=round(1000 * (time.monotonic() - self.started)),
        )
        logger.info(
            "Request body over the plan's cap of %s bytes refused before it was read",
            self.limit,
            extra={"request_id": request_id, "tenant_id": self.principal.tenant_id},
        )
        return CallerRefusal(
            message=too_large(size, self.limit).message,
            headers=((REQUEST_ID_HEADER.encode(), request_id.encode()),),
        )


@dataclass(frozen=True, slots=True)
class UnauthenticatedCap:
    """The floor, for a caller without a valid key: what it sends past it is refused with
    the 401 the view would answer (``webplatform.api.errors``), nothing more read."""

    error: ApplicationError

    @property
    def limit(self) -> int:
        return chat_body_cap_floor()

    async def refused(self, *, size: int | None) -> CallerRefusal:
        return CallerRefusal(
            message=self.error.message,
            headers=(
                (REQUEST_ID_HEADER.encode(), new_request_id().encode()),
                (b"www-authenticate", b"Bearer"),
            ),
            status=401,
            code=self.error.code,
        )


def _refusal_record(*, principal: ApiPrincipal, request_id: str, latency_ms: int) -> None:
    try:
        usage_record_create(
            tenant=principal.tenant,
            request_id=request_id,
            channel=UsageRecord.Channel.REST,
            model="",
            status=UsageRecord.Status.ERROR,
            api_key=principal.api_key,
            user=principal.user,
            error_code="request_too_large",
            total_latency_ms=latency_ms,
        )
    except Exception:  # the client's answer does not depend on its record
        logger.exception("Could not record a refused request")


def _header(scope: Scope, name: bytes) -> str:
    headers: Iterable[tuple[bytes, bytes]] = scope.get("headers", [])  # type: ignore[assignment]
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return ""


def _raw_api_key(scope: Scope) -> str | None:
    """The key ``tenants.authentication.ApiKeyAuthentication`` would read: ``Authorization:
    Bearer``, else ``X-API-Key``."""
    scheme, _, credentials = _header(scope, b"authorization").partition(" ")
    if scheme.lower() == "bearer":
        return credentials.strip() or None
    return _header(scope, b"x-api-key").strip() or None


def _missing_key_error(scope: Scope) -> ApplicationError:
    """The view's 401 without a key (``tenants.authentication.ApiKeyAuthentication``)."""
    scheme, _, _credentials = _header(scope, b"authorization").partition(" ")
    if scheme.lower() == "bearer":
        return ApplicationError(
            "The Authorization header says Bearer but carries no API key.",
            code="invalid_api_key",
            status=401,
        )
    return ApplicationError(MISSING_KEY_MESSAGE, code="invalid_api_key", status=401)


def _plan_capped(scope: Scope) -> bool:
    try:
        return resolve(app_path(scope)).url_name in _PLAN_CAPPED_ROUTES
    except Resolver404:
        return False


async def caller_body_cap(
    scope: Scope, declared: int | None
) -> PlanBodyCap | UnauthenticatedCap | None:
    """The caller's plan cap for this request, or None where the global cap is all there is
    (see the module's docstring). ``declared``: the ``Content-Length``, None when absent."""
    started = time.monotonic()
    if declared is not None and declared <= chat_body_cap_floor():
        return None
    if scope.get("method") != "POST" or not _plan_capped(scope):
        return None
    raw_key = _raw_api_key(scope)
    if raw_key is None:
        return UnauthenticatedCap(_missing_key_error(scope))
    try:
        principal = await database_sync_to_async(api_key_authenticate)(raw_key=raw_key)
    except ApplicationError as error:  # unknown, revoked, expired: the view's 401
        return UnauthenticatedCap(error)
    except (StoreUnavailable, DatabaseError):
        # Ours, not the caller's: the view answers it (503, or its own error) after the
        # global cap, as without this module.
        logger.warning("caller's body cap: key lookup failed", exc_info=True)
        return None
    return PlanBodyCap(limit=principal_body_cap(principal), principal=principal, started=started)
