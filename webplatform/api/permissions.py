"""Permission classes of the API views."""

from __future__ import annotations

from rest_framework.permissions import SAFE_METHODS, BasePermission
from rest_framework.request import Request
from rest_framework.views import APIView

from tenants.principals import ApiPrincipal


class KeyAccessAllowsMethod(BasePermission):
    """A read-only key may call GET (and HEAD, OPTIONS) endpoints only: 403
    ``insufficient_permissions`` otherwise."""

    message = (
        "You have insufficient permissions for this operation: this API key is read-only "
        "(GET endpoints only). Use a key with full access."
    )
    code = "insufficient_permissions"

    def has_permission(self, request: Request, view: APIView) -> bool:
        if request.method in SAFE_METHODS:
            return True
        principal = request.user
        return isinstance(principal, ApiPrincipal) and principal.can_write
