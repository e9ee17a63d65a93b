"""The last route under /v1/: any other path is a JSON 404, never an HTML page."""

from __future__ import annotations

from typing import Any, NoReturn

from django.http import HttpRequest
from drf_spectacular.utils import extend_schema
from rest_framework.request import Request

from tenants.errors import ApplicationError
from webplatform.api.base import AuthenticatedApiView


@extend_schema(exclude=True)  # a catch-all, not an operation
class UnknownPathApi(AuthenticatedApiView):
    """404 ``not_found`` for any method. No key needed (as OpenAI answers); a key that is
    sent is still checked, and a good one gets the rate-limit headers."""

    permission_classes: list[type] = []

    def not_found(self, request: Request | HttpRequest, *args: Any, **kwargs: Any) -> NoReturn:
        raise ApplicationError(
            f"Invalid URL ({request.method} {request.path})", code="not_found", status=404
        )

    get = post = put = patch = delete = head = options = http_method_not_allowed = not_found
