"""Render every API error in the OpenAI error format.

``{"error": {"message", "type", "param", "code"}}`` for everything under /v1/: our
``ApplicationError``, DRF's own exceptions (validation, authentication, permission, parse,
method, media type, throttling), Django's ``Http404``/``PermissionDenied``, unexpected
exceptions (500, logged), and 404/500 raised outside any DRF view (``handler404`` and
``handler500`` in ``webplatform.urls`` call ``not_found`` and ``server_error`` here).

Each of them is first made the ``ApplicationError`` it means (``as_application_error``);
``openai_wire.error_object`` is the one builder of the body.
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
from tenants.outages import STORE_OUTAGES, store_unavailable_error
from webplatform.api.openai_wire import as_json_data, error_object

logger = logging.getLogger(__name__)

API_PATH_PREFIX = "/v1/"

MISSING_KEY_MESSAGE = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or in an X-API-Key header."
)
SERVER_ERROR = ApplicationError(
    "The server had an error while processing your request. Sorry about that! "
    "You can retry your request.",
    code="internal_error",
    status=500,
    type="server_error",
)


def _body(error: ApplicationError) -> Any:
    return as_json_data(error_object(error))


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


def _validation_error(exc: exceptions.ValidationError) -> ApplicationError:
    param, leaf = _first_validation_error(exc.detail)
    leaf_code = getattr(leaf, "code", None)
    code = "missing_required_parameter" if leaf_code in {"required", "null"} else "invalid_value"
    message = f"{param}: {leaf}" if param else str(leaf)
    return ApplicationError(message, code=code, param=param)


_API_EXCEPTION_CODES: dict[type[exceptions.APIException], str] = {
    exceptions.ParseError: "invalid_json",
    exceptions.NotFound: "not_found",
    exceptions.MethodNotAllowed: "method_not_allowed",
    exceptions.NotAcceptable: "not_acceptable",
    exceptions.UnsupportedMediaType: "unsupported_media_type",
    exceptions.PermissionDenied: "insufficient_permissions",
    exceptions.Throttled: "rate_limit_exceeded",
}


def _api_exception_error(exc: exceptions.APIException) -> ApplicationError:
    if isinstance(exc, exceptions.ValidationError):
        return _validation_error(exc)
    if isinstance(exc, exceptions.NotAuthenticated):
        return ApplicationError(MISSING_KEY_MESSAGE, code="invalid_api_key")
    detail = exc.detail
    message = str(detail) if not isinstance(detail, (dict, list)) else str(exc.default_detail)
    detail_code = getattr(detail, "code", None)
    if isinstance(exc, exceptions.AuthenticationFailed):
        # Our authentication class sets the OpenAI code (invalid_api_key, api_key_revoked...).
        code = detail_code if detail_code != exceptions.AuthenticationFailed.default_code else None
        return ApplicationError(message, code=code or "invalid_api_key")
    if isinstance(exc, exceptions.PermissionDenied) and detail_code not in (
        None,
        exceptions.PermissionDenied.default_code,
    ):
        return ApplicationError(message, code=str(detail_code))
    for exc_type, code in _API_EXCEPTION_CODES.items():
        if isinstance(exc, exc_type):
            error_type = "rate_limit_error" if exc.status_code == 429 else "invalid_request_error"
            return ApplicationError(message, code=code, type=error_type)
    error_type = "server_error" if exc.status_code >= 500 else "invalid_request_error"
    return ApplicationError(message, code=str(detail_code or exc.default_code), type=error_type)


def _api_exception_headers(exc: exceptions.APIException) -> dict[str, str]:
    headers = {}
    # Set by DRF on the exceptions that have them (authentication, throttling).
    auth_header = getattr(exc, "auth_header", None)
    if auth_header:
        headers["WWW-Authenticate"] = str(auth_header)
    wait = getattr(exc, "wait", None)
    if wait:
        headers["Retry-After"] = str(int(wait))
    return headers


def as_application_error(exc: Exception) -> ApplicationError | None:
    """The ``ApplicationError`` an API view's exception means; None for an unexpected one."""
    if isinstance(exc, ApplicationError):
        return exc
    if isinstance(exc, STORE_OUTAGES):  # Redis down or hung: 503 with retry-after
        return store_unavailable_error()
    if isinstance(exc, Http404):
        exc = exceptions.NotFound(*exc.args)
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied(*exc.args)
    if isinstance(exc, exceptions.APIException):
        error = _api_exception_error(exc)
        error.status = exc.status_code
        error.headers = _api_exception_headers(exc)
        return error
    return None


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response:
    """DRF's EXCEPTION_HANDLER: every exception of an API view becomes an OpenAI error."""
    error = as_application_error(exc)
    if error is None:
        request = context.get("request")
        logger.error(
            "Unhandled exception in API view %s",
            getattr(request, "path", "?"),
            exc_info=(type(exc), exc, exc.__traceback__),
        )
        error = SERVER_ERROR
    set_rollback()
    return Response(_body(error), status=error.status, headers=error.headers)


def is_api_path(request: HttpRequest) -> bool:
    return request.path.startswith(API_PATH_PREFIX) or request.path == API_PATH_PREFIX[:-1]


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """``handler404``: JSON under /v1/, Django's page elsewhere."""
    if is_api_path(request):
        error = ApplicationError(
            f"Invalid URL ({request.method} {request.path})", code="not_found", status=404
        )
        return JsonResponse(_body(error), status=error.status)
    return defaults.page_not_found(request, exception)


def server_error(request: HttpRequest) -> HttpResponse:
    """``handler500``: JSON under /v1/, Django's page elsewhere."""
    if is_api_path(request):
        return JsonResponse(_body(SERVER_ERROR), status=SERVER_ERROR.status)
    return defaults.server_error(request)
