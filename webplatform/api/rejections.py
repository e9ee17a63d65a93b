"""A usage record for each refused chat completion, so that it shows in the dashboard.

A request refused before admission (a read-only key, an unknown model, ``max_tokens`` above
the plan, a body the schema refuses...) reaches no settlement, so nothing else records it;
the customer would see "Errors 0" after a day of 4xx. ``rejections_recorded`` wraps the
``/v1/chat/completions`` view: an error response to an authenticated caller becomes an
``error`` usage record with the response's OpenAI error code, under the request's
``x-request-id``. Recording is idempotent on the request id, so a request the request path
already recorded (one that reached admission) keeps its own record.

Callers that fail authentication (401) belong to no organisation and are not recorded.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from asgiref.sync import sync_to_async
from django.http import HttpRequest, HttpResponse

from tenants.models import UsageRecord
from tenants.principals import ApiPrincipal
from tenants.services.usage import usage_record_create
from webplatform.middleware import request_id_of

logger = logging.getLogger(__name__)

# An async view (adrf's ``as_view()``); typed loosely, as Django's URL patterns take it.
AsyncView = Callable[..., Any]


def _error_code(response: HttpResponse) -> str:
    data = getattr(response, "data", None)
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return str(data["error"].get("code") or "")[:64]
    return f"http_{response.status_code}"


def rejection_record(*, request: HttpRequest, response: HttpResponse, latency_ms: int) -> None:
    """Record ``response`` (an error) to an authenticated API caller as an error record."""
    principal = getattr(request, "user", None)
    if response.status_code < 400 or not isinstance(principal, ApiPrincipal):
        return
    try:
        usage_record_create(
            tenant=principal.tenant,
            request_id=request_id_of(request),
            channel=UsageRecord.Channel.REST,
            model="",
            status=UsageRecord.Status.ERROR,
            api_key=principal.api_key,
            user=principal.user,
            error_code=_error_code(response),
            total_latency_ms=latency_ms,
        )
    except Exception:  # the client's answer does not depend on its record
        logger.exception("Could not record a refused request")


def rejections_recorded(view: AsyncView) -> AsyncView:
    """Wrap an async API view so its error responses are recorded (``rejection_record``)."""

    @functools.wraps(view)
    async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        started = time.monotonic()
        response: HttpResponse = await view(request, *args, **kwargs)
        if response.status_code >= 400:
            await sync_to_async(rejection_record)(
                request=request,
                response=response,
                latency_ms=round(1000 * (time.monotonic() - started)),
            )
        return response

    return wrapper
