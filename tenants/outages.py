"""A Redis outage on the request path is a 503 ``service_unavailable``, never a 500.

Every web-side Redis user (the inference client, the quota store, the Django cache that
holds the answer cache and the API-key cache, the routing reads) fails fast when Redis is
down or hung (``tenants.redis_options``); what it raises is one of ``STORE_OUTAGES``. Each
entry point turns that into the same error: status 503, code ``service_unavailable``,
``retry-after: REDIS_UNAVAILABLE_RETRY_AFTER`` (``store_unavailable_error``), or in-band at
the end of a stream that already sent its headers.

DRF marks a request unauthenticated only when authentication raises its own exception type;
anything else is raised again each time the view reads ``request.user`` (its
``finalize_response`` does). So authentication raises ``StoreUnavailable``, a DRF
``APIException`` (not an ``ApplicationError``, which the API-key authentication turns into a
401), rendered by the REST error handler as the same 503 with its ``Retry-After``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import redis
from django.conf import settings
from django_redis.exceptions import ConnectionInterrupted
from rest_framework import exceptions

from tenants.errors import ApplicationError

# What a Redis outage raises: redis-py's connection errors (refused, reset, closed; also
# BusyLoadingError while a restarted server loads) and timeouts, and django-redis's wrapper
# of both. A ResponseError is not an outage: it is a bug, and stays a 500.
STORE_OUTAGES: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    ConnectionInterrupted,
)

STORE_UNAVAILABLE_MESSAGE = "The service is temporarily unavailable. Please retry shortly."


def store_unavailable_retry_after() -> int:
    return max(1, int(settings.REDIS_UNAVAILABLE_RETRY_AFTER))


def store_unavailable_error() -> ApplicationError:
    """The client's error for a Redis outage (a new instance each time: renderers may add
    headers)."""
    return ApplicationError(
        STORE_UNAVAILABLE_MESSAGE,
        code="service_unavailable",
        status=503,
        type="server_error",
        headers={"retry-after": str(store_unavailable_retry_after())},
    )


class StoreUnavailable(exceptions.APIException):
    """``store_unavailable_error`` as DRF's exception type, for authentication."""

    status_code = 503
    default_code = "service_unavailable"
    default_detail = STORE_UNAVAILABLE_MESSAGE

    def __init__(self) -> None:
        super().__init__()
        self.wait = store_unavailable_retry_after()  # DRF's Retry-After


_P = ParamSpec("_P")
_T = TypeVar("_T")


def outage_raises_store_unavailable(fn: Callable[_P, _T]) -> Callable[_P, _T]:
    """Decorate an authentication step: a Redis outage inside it raises
    ``StoreUnavailable``."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return fn(*args, **kwargs)
        except STORE_OUTAGES as exc:
            raise StoreUnavailable() from exc

    return wrapper
