"""Render every API error in the OpenAI error format.

``{"error": {"message", "type", "param", "code"}}`` for everything under /v1/: our
``ApplicationError``, DRF's own exceptions (validation, authentication, permission, parse,
method, media type, throttling), Django's ``Http404``/``PermissionDenied``, unexpected
exceptions (500, logged), and 404/500 raised outside any DRF view (``handler404`` and
``handler500`` in ``webplatform.urls`` call ``not_found`` and ``server_error`` here).
"""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.views import set_rollback

from tenants.errors import ApplicationError

logger = logging.getLogger(__name__)

API_PATH_PREFIX = "/v1/"

MISSING_KEY_MESSAGE = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or in an X-API-Key header."
)
SERVER_ERROR_MESSAGE = (
    "The server had an error while processing your request. Sorry about that! "
    "You can retry your request."
)


def openai_error(
    message: str, *, code: str | None, type: str = "invalid_request_error", param: str | None = None
) -> dict[str, dict[str, str | None]]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _first_validation_error(detail: Any, path: tuple[str, ...] = ()) -> tuple[str | None, Any]:
    """The first leaf of a DRF ValidationError detail and its dotted path ("messages.0.role")."""
    if isinstance(detail, dict):
        for key, value in detail.items():
            return _first_validation_error(value, path + (str(key),))
    if isinstance(detail, list):
        if not detail:
            return None, "Invalid request."
        if all(not isinstance(item, (dict, list)) for item in detail):
            return _param(path), detail[0]
        for index, item in enumerate(detail):
            if item:
                return _first_validation_error(item, path + (str(index),))
    return _param(path), detail


def _param(path: tuple[str, ...]) -> str | None:
    names = [p for p in path if p != "non_field_errors"]
    return ".".join(names) or None


def _validation_error(exc: exceptions.ValidationError) -> dict[str, dict[str, str | None]]:
    param, leaf = _first_validation_error(exc.detail)
    leaf_code = getattr(leaf, "code", None)
    code = "missing_required_parameter" if leaf_code in {"required", "null"} else "invalid_value"
    message = f"{param}: {leaf}" if param else str(leaf)
    return openai_error(message, code=code, param=param)


_API_EXCEPTION_CODES: dict[type[exceptions.APIException], str] = {
    exceptions.ParseError: "invalid_json",
    exceptions.NotFound: "not_found",
    exceptions.MethodNotAllowed: "method_not_allowed",
    exceptions.NotAcceptable: "not_acceptable",
    exceptions.UnsupportedMediaType: "unsupported_media_type",
    exceptions.PermissionDenied: "insufficient_permissions",
    exceptions.Throttled: "rate_limit_exceeded",
}


def _api_exception_body(exc: exceptions.APIException) -> dict[str, dict[str, str | None]]:
    if isinstance(exc, exceptions.ValidationError):
        return _validation_error(exc)
    if isinstance(exc, exceptions.NotAuthenticated):
        return openai_error(MISSING_KEY_MESSAGE, code="invalid_api_key")
    detail = exc.detail
    message = str(detail) if not isinstance(detail, (dict, list)) else str(exc.default_detail)
    detail_code = getattr(detail, "code", None)
    if isinstance(exc, exceptions.AuthenticationFailed):
        # Our authentication class sets the OpenAI code (invalid_api_key, api_key_revoked...).
        code = detail_code if detail_code != exceptions.AuthenticationFailed.default_code else None
        return openai_error(message, code=code or "invalid_api_key")
    if isinstance(exc, exceptions.PermissionDenied) and detail_code not in (
        None,
        exceptions.PermissionDenied.default_code,
    ):
        return openai_error(message, code=detail_code)
    for exc_type, code in _API_EXCEPTION_CODES.items():
        if isinstance(exc, exc_type):
            error_type = "rate_limit_error" if exc.status_code == 429 else "invalid_request_error"
            return openai_error(message, code=code, type=error_type)
    error_type = "server_error" if exc.status_code >= 500 else "invalid_request_error"
    return openai_error(message, code=detail_code or exc.default_code, type=error_type)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response:
    """DRF's EXCEPTION_HANDLER: every exception of an API view becomes an OpenAI error."""
    if isinstance(exc, ApplicationError):
        set_rollback()
        return Response(exc.as_openai(), status=exc.status, headers=exc.headers)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound(*exc.args)
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied(*exc.args)
    if isinstance(exc, exceptions.APIException):
        headers = {}
        if getattr(exc, "auth_header", None):
            headers["WWW-Authenticate"] = exc.auth_header  # type: ignore[attr-defined]
        if getattr(exc, "wait", None):
            headers["Retry-After"] = str(int(exc.wait))  # type: ignore[attr-defined]
        set_rollback()
        return Response(_api_exception_body(exc), status=exc.status_code, headers=headers)
    request = context.get("request")
    logger.error(
        "Unhandled exception in API view %s",
        getattr(request, "path", "?"),
        exc_info=(type(exc), exc, exc.__traceback__),
    )
    set_rollback()
    return Response(
        openai_error(SERVER_ERROR_MESSAGE, code="internal_error", type="server_error"), status=500
    )


def is_api_path(request: HttpRequest) -> bool:
    return request.path.startswith(API_PATH_PREFIX) or request.path == API_PATH_PREFIX[:-1]


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """``handler404``: JSON under /v1/, Django's page elsewhere."""
    if is_api_path(request):
        return JsonResponse(
            openai_error(f"Invalid URL ({request.method} {request.path})", code="not_found"),
            status=404,
        )
    return defaults.page_not_found(request, exception)  # type: ignore[arg-type]


def server_error(request: HttpRequest) -> HttpResponse:
    """``handler500``: JSON under /v1/, Django's page elsewhere."""
    if is_api_path(request):
        return JsonResponse(
            openai_error(SERVER_ERROR_MESSAGE, code="internal_error", type="server_error"),
            status=500,
        )
    return defaults.server_error(request)
