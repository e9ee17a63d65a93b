"""The fields every web log line of a request carries: structlog's context variables.

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

import structlog

from tenants.principals import ApiPrincipal


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
