"""The web side's request logs: the fields every line of a request carries (structlog's
context variables), and one line per settled completion (``log_completion_settled``).

The JSON formatter (``inference.worker.logs.json_formatter``, the web's ``LOGGING`` too)
merges them into each line, so a line written anywhere while a request is served (a
settlement failure, a cache outage, Django's own ``django.request`` warning) names its
request, tenant, key and model without passing them along:

- ``request_id``: bound by ``RequestIdMiddleware`` for every HTTP request, and by the
  request path for each completion (the websocket has one per ``message`` frame);
- ``tenant_id`` and ``key_id`` (the key's public id, never the key): bound when an API key
  authenticates (``tenants.authentication``) and when a completion starts;
- ``model``: the model asked for, bound once admission allowed it, so a name the client
  made up never reaches a line through it.

Context variables belong to the asyncio task: each HTTP request and each websocket
``message`` runs in a task of its own, so one request's fields never reach another's lines.
A synchronous server thread reuses its context, so the middleware starts each request from
an empty one.
"""

from __future__ import annotations

import logging

import structlog

from inference.protocol import Usage
from tenants.principals import ApiPrincipal

logger = logging.getLogger("webplatform.requests")


def log_context_start(*, request_id: str) -> None:
    """A new HTTP request: drop whatever an earlier request of this context bound."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)


def log_context_bind(*, request_id: str, principal: ApiPrincipal, model: str | None = None) -> None:
    """A completion's request id, its caller and (once allowed) its model."""
    fields = {"request_id": request_id, "tenant_id": str(principal.tenant_id)}
    if principal.api_key is not None:
        fields["key_id"] = principal.api_key.public_id
    if model is not None:
        fields["model"] = model
    structlog.contextvars.bind_contextvars(**fields)


# Errors that were ours, not the client's or the model's: logged at WARNING.
_OUR_ERRORS = frozenset({"internal_error", "out_of_memory", "worker_lost", "service_unavailable"})


def log_completion_settled(
    *,
    request_id: str,
    principal: ApiPrincipal,
    channel: str,
    model: str,
    status: str,
    error_code: str,
    cache_hit: bool,
    usage: Usage,
    image_count: int,
    ttft_s: float | None,
    latency_s: float,
    route_rule: str,
) -> None:
    """The web's request log: one line per settled completion (``completion settled``).

    Ids, counts and timings only: never the prompt, the answer, an image or the key (its
    public id is not a secret: the dashboard shows it). ``model`` is the one that answered
    (a fallback's when one did); ``ttft_s`` and ``latency_s`` run from admission.
    """
    fields = {
        "request_id": request_id,
        "tenant_id": str(principal.tenant_id),
        "key_id": principal.api_key.public_id if principal.api_key is not None else None,
        "channel": channel,
        "model": model,
        "status": status,
        "error_code": error_code or None,
        "cache_hit": cache_hit,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "image_tokens": usage.image_tokens,
        "image_count": image_count,
        "ttft_s": None if ttft_s is None else round(ttft_s, 4),
        "latency_s": round(latency_s, 4),
        "route_rule": route_rule or None,
    }
    level = logging.WARNING if error_code in _OUR_ERRORS else logging.INFO
    logger.log(level, "completion settled", extra=fields)
