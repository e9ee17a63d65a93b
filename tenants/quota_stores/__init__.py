"""Where quota counters live: Redis (production) or this process (embedded mode).

Both stores implement the same three operations with the same semantics; the services in
``tenants.services.quotas`` talk only to the ``QuotaStore`` protocol, and
``quota_store_get()`` picks the implementation from settings.

Semantics, per tenant:

- Requests per minute: a sliding-window log. A request counts for exactly 60 s after its
  admission; at most ``requests_per_minute`` admissions in any 60 s. (Exact, no burst at a
  window edge; memory is one sorted-set entry per admitted request of the last minute.)
- Tokens per day: one counter per UTC day holding tokens used plus tokens reserved by
  requests in flight. Admission reserves; ``finish`` replaces the reservation with what was
  used (0 to release). A finish after the UTC day changed adjusts nothing: the old day's
  counter is no longer read.
- Concurrent requests: a lease per admitted request, kept until ``finish`` or until it
  expires (``lease_ms``), so a process that crashes mid-request leaks its slot only until
  then. The reservation of an expired lease stays charged (we cannot know what it used).
- One atomic operation checks all three limits and, only when all pass, applies all three;
  a refusal changes no counter. Forgetting entries older than the window, and leases past
  their expiry, is housekeeping done either way.

Time: the Redis store reads the Redis server clock (``TIME``) inside the script, so every
web process agrees on one clock whatever its host's drift; the caller may pass ``now_ms``,
which only tests do, to move the clock.
"""

from __future__ import annotations

import functools

from django.conf import settings

from tenants.quota_stores.base import (
    _REFUSALS,
    CONCURRENCY_RETRY_MS,
    DAY_MS,
    REFUSED_CONCURRENCY,
    REFUSED_REQUESTS,
    REFUSED_TOKENS,
    WINDOW_MS,
    AdmitOutcome,
    QuotaState,
    QuotaStore,
)
from tenants.quota_stores.local_store import LocalQuotaStore, _TenantCounters
from tenants.quota_stores.redis_store import (
    QUOTA_LUA,
    RedisQuotaStore,
    _optional_ms,
    redis_client_for,
)

__all__ = [
    "CONCURRENCY_RETRY_MS",
    "DAY_MS",
    "QUOTA_LUA",
    "REFUSED_CONCURRENCY",
    "REFUSED_REQUESTS",
    "REFUSED_TOKENS",
    "WINDOW_MS",
    "AdmitOutcome",
    "LocalQuotaStore",
    "QuotaState",
    "QuotaStore",
    "RedisQuotaStore",
    "_REFUSALS",
    "_TenantCounters",
    "_optional_ms",
    "quota_store_get",
    "redis_client_for",
]

# --- Choosing one -------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _quota_store_build(backend: str, redis_url: str, key_prefix: str) -> QuotaStore:
    if backend == "redis":
        if not redis_url:
            raise RuntimeError("QUOTA_BACKEND is 'redis' but REDIS_URL is not set")
        return RedisQuotaStore(client=redis_client_for(redis_url), key_prefix=key_prefix)
    if backend == "local":
        return LocalQuotaStore()
    raise RuntimeError(f"Unknown QUOTA_BACKEND {backend!r} (use 'redis' or 'local')")


def quota_store_get() -> QuotaStore:
    """The store settings ask for: Redis when ``REDIS_URL`` is set, else this process.

    ``QUOTA_BACKEND`` ("redis" / "local") forces one; ``QUOTA_KEY_PREFIX`` (default
    "quota") namespaces the Redis keys, and gives a fresh local store per prefix.
    """
    redis_url = settings.REDIS_URL
    backend = settings.QUOTA_BACKEND or ("redis" if redis_url else "local")
    key_prefix = settings.QUOTA_KEY_PREFIX
    return _quota_store_build(backend, redis_url, key_prefix)
