"""The base of every authenticated API view, and the one typed way to its caller.

DRF's ``request.user`` is typed as Django's user; on the API it is the ``ApiPrincipal`` that
``tenants.authentication.ApiKeyAuthentication`` put there. ``principal_of(request)`` says so,
checked, so views, permissions and the request path read the caller with its type.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rest_framework import exceptions
from rest_framework.permissions import BasePermission, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from tenants.outages import STORE_OUTAGES
from tenants.principals import ApiPrincipal
from tenants.services.quotas import RATE_LIMIT_HEADER_NAMES, quota_status
from webplatform.api.permissions import KeyAccessAllowsMethod


def principal_of(request: Request) -> ApiPrincipal:
    """The authenticated caller of an API request (401 ``invalid_api_key`` without one)."""
    principal = request.user
    if not isinstance(principal, ApiPrincipal):
        raise exceptions.NotAuthenticated()
    return principal


class AuthenticatedApiView(APIView):
    # An API view for a tenant's principal (API key), with the x-ratelimit-* headers on every
    # response it gives to an authenticated caller, errors included. (Comments, not a
    # docstring: the OpenAPI schema would show a docstring to customers as the description
    # of every view that has none of its own.)
    #
    # A view that admitted its request (quota_admit) puts admission.headers on its response
    # (Response(body, headers=admission.headers); a 429 from quota_admit carries them
    # already); for every other response the headers come from quota_status, which reads
    # and consumes nothing.

    permission_classes: Sequence[type[BasePermission]] = (IsAuthenticated, KeyAccessAllowsMethod)

    @property
    def principal(self) -> ApiPrincipal:
        """The authenticated caller (call from a handler, after authentication)."""
        return principal_of(self.request)

    def finalize_response(
        self, request: Request, response: Response, *args: Any, **kwargs: Any
    ) -> Response:
        response = super().finalize_response(request, response, *args, **kwargs)
        if RATE_LIMIT_HEADER_NAMES[0] in response:
            return response
        try:
            principal = request.user
        except exceptions.APIException:
            return response  # authentication failed: no tenant, no headers
        if isinstance(principal, ApiPrincipal):
            try:
                status = quota_status(tenant_id=principal.tenant_id, limits=principal.limits)
            except STORE_OUTAGES as exc:  # Redis down: the 503 of tenants.outages instead
                error = self.handle_exception(exc)
                return super().finalize_response(request, error, *args, **kwargs)
            for name, value in status.headers.items():
                response[name] = value
        return response
