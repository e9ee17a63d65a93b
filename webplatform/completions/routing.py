"""Step 4, route: pick the model that will answer, or refuse at once with a 503.

A request must never hang in a queue that cannot serve it. When no worker of the model is
alive, or its queue is deeper than its workers can start within the bound, the request goes
to the tenant plan's fallback model if it has one (the response's ``model`` field says so),
else it is refused with ``model_unavailable`` / ``model_overloaded`` and a ``retry-after``.
"""

from __future__ import annotations

from django.conf import settings

from inference.client import InferenceClient
from tenants.errors import ApplicationError
from webplatform.metrics import model_fallback


async def _refusal(client: InferenceClient, model: str) -> ApplicationError | None:
    """Why ``model`` cannot take a request now, or None when it can."""
    health = await client.model_health(model)
    if health.live_workers == 0:
        return ApplicationError(
            f"The model '{model}' is not available right now; no worker is serving it.",
            code="model_unavailable",
            status=503,
            type="server_error",
            headers={"retry-after": str(settings.MODEL_UNAVAILABLE_RETRY_AFTER)},
        )
    # Requests a worker can start now are its free batch slots; beyond that they wait about
    # one request's service time per batch. Refuse when the wait would exceed the bound.
    max_waiting = health.capacity * settings.MODEL_MAX_QUEUE_PER_SLOT
    if health.queue_depth > max_waiting:
        return ApplicationError(
            f"The model '{model}' is overloaded; retry shortly.",
            code="model_overloaded",
            status=503,
            type="server_error",
            headers={"retry-after": str(settings.MODEL_OVERLOADED_RETRY_AFTER)},
        )
    return None


async def model_route(*, client: InferenceClient, model: str, fallback: str | None) -> str:
    """The model to submit to: ``model``, else ``fallback``; raises the model's refusal when
    neither can serve."""
    refusal = await _refusal(client, model)
    if refusal is None:
        return model
    if fallback and fallback != model and await _refusal(client, fallback) is None:
        model_fallback(model=model, fallback=fallback)
        return fallback
    raise refusal
