"""Admission control: requests per minute, tokens per day, concurrent requests.

How the chat completions service uses it::

    admission = quota_admit(
        tenant_id=principal.tenant_id,
        limits=principal.limits,
        reserve_tokens=prompt_token_estimate + max_tokens,  # the most it can use
    )                                      # raises ApplicationError 429 when refused
    try:
        ...run the request...
    except BaseException:
        quota_release(admission=admission)  # refund the reservation, free the slot
        raise
    quota_settle(admission=admission, used_tokens=prompt_tokens + completion_tokens)
    return Response(body, headers=admission.headers)  # x-ratelimit-* at admission

``quota_settle`` and ``quota_release`` are idempotent per admission (the second call is a
no-op), so calling ``quota_release`` in a ``finally`` after a settle is safe.

Each refusal is an ``ApplicationError`` with status 429, the ``x-ratelimit-*`` headers,
``retry-after`` (whole seconds, at least 1) and ``retry-after-ms``:

- ``rate_limit_exceeded`` (type ``rate_limit_error``): requests per minute (sliding window);
- ``tokens_quota_exceeded`` (type ``insufficient_quota``, as OpenAI types an exhausted
  quota; the OpenAI SDKs retry any 429, so it also carries ``x-should-retry: false``, which
  they honour: the daily budget will not come back within a retry's wait);
- ``concurrency_limit_exceeded`` (type ``rate_limit_error``): requests in flight.

The ``x-ratelimit-*-tokens`` headers describe the tokens-per-day budget (OpenAI's describe
a per-minute budget; the names are kept so OpenAI clients parse them). Reset values are
OpenAI's duration strings (Go style: ``"20ms"``, ``"1s"``, ``"6m0s"``, ``"1h2m3.5s"``): the
time until the counter is back to its full allowance.

What counts: only admitted requests (chat completions). ``GET /v1/models`` and
``GET /v1/usage`` show ``quota_status`` without consuming anything.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

from django.conf import settings

from tenants.errors import ApplicationError
from tenants.principals import EffectiveLimits
from tenants.quota_stores import (
    DAY_MS,
    REFUSED_CONCURRENCY,
    REFUSED_REQUESTS,
    REFUSED_TOKENS,
    WINDOW_MS,
    QuotaState,
    quota_store_get,
)


def duration_format(milliseconds: int) -> str:
    """A duration as OpenAI writes reset times (Go's ``time.Duration`` at ms precision)."""
    ms = max(int(milliseconds), 0)
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    text = f"{seconds}.{millis:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text


@dataclass(frozen=True, slots=True)
class QuotaStatus:
    """A tenant's rate-limit position, as the ``x-ratelimit-*`` headers and /v1/usage show it."""

    limit_requests: int
    remaining_requests: int
    reset_requests_ms: int
    limit_tokens: int
    remaining_tokens: int
    reset_tokens_ms: int
    limit_concurrent: int
    in_flight: int

    @property
    def headers(self) -> dict[str, str]:
        return {
            "x-ratelimit-limit-requests": str(self.limit_requests),
            "x-ratelimit-remaining-requests": str(self.remaining_requests),
            "x-ratelimit-reset-requests": duration_format(self.reset_requests_ms),
            "x-ratelimit-limit-tokens": str(self.limit_tokens),
            "x-ratelimit-remaining-tokens": str(self.remaining_tokens),
            "x-ratelimit-reset-tokens": duration_format(self.reset_tokens_ms),
        }


RATE_LIMIT_HEADER_NAMES = tuple(QuotaStatus(0, 0, 0, 0, 0, 0, 0, 0).headers)


@dataclass(frozen=True, slots=True)
class Admission:
    """An admitted request: hold it until ``quota_settle`` or ``quota_release``."""

    tenant_id: int
    lease_id: str
    reserved_tokens: int
    status: QuotaStatus  # the tenant's position right after this admission

    @property
    def headers(self) -> dict[str, str]:
        return self.status.headers


def _status_from_state(*, state: QuotaState, limits: EffectiveLimits) -> QuotaStatus:
    now = state.now_ms
    reset_requests = (
        state.requests_newest_ms + WINDOW_MS - now if state.requests_newest_ms is not None else 0
    )
    reset_tokens = (state.day + 1) * DAY_MS - now if state.tokens_used > 0 else 0
    return QuotaStatus(
        limit_requests=limits.requests_per_minute,
        remaining_requests=max(limits.requests_per_minute - state.requests_used, 0),
        reset_requests_ms=max(reset_requests, 0),
        limit_tokens=limits.tokens_per_day,
        remaining_tokens=max(limits.tokens_per_day - state.tokens_used, 0),
        reset_tokens_ms=max(reset_tokens, 0),
        limit_concurrent=limits.concurrent_requests,
        in_flight=state.in_flight,
    )


def _lease_ms() -> int:
    return int(settings.QUOTA_LEASE_SECONDS * 1000)


def _refusal(
    *, refused_by: str, retry_after_ms: int, status: QuotaStatus, reserve_tokens: int
) -> ApplicationError:
    retry_text = duration_format(retry_after_ms)
    headers = {
        **status.headers,
        "retry-after": str(max(1, math.ceil(retry_after_ms / 1000))),
        "retry-after-ms": str(max(retry_after_ms, 1)),
    }
    if refused_by == REFUSED_REQUESTS:
        return ApplicationError(
            f"Rate limit reached for requests per minute: limit {status.limit_requests}. "
            f"Please try again in {retry_text}.",
            code="rate_limit_exceeded",
            type="rate_limit_error",
            status=429,
            headers=headers,
        )
    if refused_by == REFUSED_TOKENS:
        return ApplicationError(
            f"Daily token quota exceeded: this request reserves {reserve_tokens} tokens "
            f"(prompt and max_tokens) and {status.remaining_tokens} of "
            f"{status.limit_tokens} remain today. The quota resets in {retry_text}.",
            code="tokens_quota_exceeded",
            type="insufficient_quota",
            status=429,
            headers={**headers, "x-should-retry": "false"},
        )
    if refused_by == REFUSED_CONCURRENCY:
        return ApplicationError(
            f"Too many concurrent requests: limit {status.limit_concurrent}. "
            "Please retry when one of your requests has finished.",
            code="concurrency_limit_exceeded",
            type="rate_limit_error",
            status=429,
            headers=headers,
        )
    raise ValueError(f"unknown refusal {refused_by!r}")


def quota_admit(*, tenant_id: int, limits: EffectiveLimits, reserve_tokens: int) -> Admission:
    """Admit one request, or raise ApplicationError 429 and change nothing.

    Checks requests per minute, then tokens per day (``reserve_tokens`` must fit in what is
    left today), then concurrency, in one atomic store operation; when all pass it counts
    the request, reserves the tokens and takes a concurrency lease (held until settle or
    release, or ``settings.QUOTA_LEASE_SECONDS`` (default 600) if the process dies).
    """
    if reserve_tokens < 0:
        raise ValueError("reserve_tokens must be >= 0")
    lease_id = uuid.uuid4().hex
    outcome = quota_store_get().admit(
        tenant_id=tenant_id,
        requests_per_minute=limits.requests_per_minute,
        tokens_per_day=limits.tokens_per_day,
        concurrent_requests=limits.concurrent_requests,
        reserve_tokens=reserve_tokens,
        lease_id=lease_id,
        lease_ms=_lease_ms(),
    )
    status = _status_from_state(state=outcome.state, limits=limits)
    if not outcome.admitted:
        raise _refusal(
            refused_by=outcome.refused_by or "",
            retry_after_ms=outcome.retry_after_ms,
            status=status,
            reserve_tokens=reserve_tokens,
        )
    return Admission(
        tenant_id=tenant_id, lease_id=lease_id, reserved_tokens=reserve_tokens, status=status
    )


def quota_settle(*, admission: Admission, used_tokens: int) -> bool:
    """The request finished: charge ``used_tokens`` instead of the reservation, free the slot.

    Returns False when there was nothing to settle (already settled or released, or the
    lease expired: then the reservation stays charged).
    """
    if used_tokens < 0:
        raise ValueError("used_tokens must be >= 0")
    return quota_store_get().finish(
        tenant_id=admission.tenant_id, lease_id=admission.lease_id, used_tokens=used_tokens
    )


def quota_release(*, admission: Admission) -> bool:
    """The request failed before using the model: refund the reservation, free the slot."""
    return quota_store_get().finish(
        tenant_id=admission.tenant_id, lease_id=admission.lease_id, used_tokens=0
    )


def quota_status(*, tenant_id: int, limits: EffectiveLimits) -> QuotaStatus:
    """The tenant's current position; reads only (one round trip on Redis)."""
    state = quota_store_get().status(tenant_id=tenant_id)
    return _status_from_state(state=state, limits=limits)
