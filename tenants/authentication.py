"""DRF authentication by API key: ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``."""

from __future__ import annotations

import structlog
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication
from rest_framework.request import Request

from tenants.errors import ApplicationError
from tenants.models import ApiKey
from tenants.principals import ApiPrincipal
from tenants.services.api_keys import api_key_authenticate


class ApiKeyAuthentication(BaseAuthentication):
    """Sets ``request.user`` to an ``ApiPrincipal`` and ``request.auth`` to the ``ApiKey``.

    No key at all returns None (DRF then answers 401 through the exception handler, whose
    message says how to send one); a key that does not authenticate raises
    ``AuthenticationFailed`` whose detail code is the OpenAI error code (``invalid_api_key``,
    ``api_key_revoked``, ``api_key_expired``).
    """

    keyword = "bearer"

    def authenticate(self, request: Request) -> tuple[ApiPrincipal, ApiKey | None] | None:
        raw_key = self._raw_key(request)
        if raw_key is None:
            return None
        try:
            principal = api_key_authenticate(raw_key=raw_key)
        except ApplicationError as error:
            # DRF only turns its own exception type into a 401 with WWW-Authenticate.
            raise exceptions.AuthenticationFailed(error.message, code=error.code) from error
        # Every later log line of this request names its tenant and key (the public id only).
        key = principal.api_key
        structlog.contextvars.bind_contextvars(
            tenant_id=str(principal.tenant_id), key_id=key.public_id if key is not None else None
        )
        return principal, principal.api_key

    def _raw_key(self, request: Request) -> str | None:
        authorization: str = request.META.get("HTTP_AUTHORIZATION", "")
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == self.keyword:
            credentials = credentials.strip()
            if not credentials:
                raise exceptions.AuthenticationFailed(
                    "The Authorization header says Bearer but carries no API key.",
                    code="invalid_api_key",
                )
            return credentials
        header_key: str = request.META.get("HTTP_X_API_KEY", "")
        header_key = header_key.strip()
        return header_key or None

    def authenticate_header(self, request: Request) -> str:
        return "Bearer"
