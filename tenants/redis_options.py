"""How every web-side Redis connection is opened: one set of options, from settings.

A Redis that is down, hung or restarted must cost a request at most about a second and
then a 503 (``tenants.outages``), and a restarted one must be used again at once, without
restarting any process (docs/reliability.md):

- short socket and connect timeouts (``REDIS_SOCKET_TIMEOUT_SECONDS``,
  ``REDIS_CONNECT_TIMEOUT_SECONDS``): a hung server (accepting TCP, answering nothing)
  fails the call instead of holding it;
- a PING before reusing a pooled connection idle longer than
  ``REDIS_HEALTH_CHECK_SECONDS``, retried on a fresh connection when it fails: connections
  opened before a restart are dropped, not handed to a command;
- ``REDIS_RETRIES`` retries with exponential backoff and jitter on connection errors only
  (refused, reset, closed by the server), never on a timeout: a timeout means the server
  is hung or overloaded, and retrying it would multiply the wait. Every command the web side
  sends may be repeated safely (reads, ``SET``, and scripts made idempotent by their ids).

redis-py's ``from_url`` gives connections no retry at all (its ``Retry`` default applies
only to ``Redis(host=...)``), so this module's options must be passed to every client.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

# Backoff between retries: 20 ms, 40 ms, 80 ms... (with jitter), never more than 250 ms, so
# that three retries on a refused connection stay well under a second.
RETRY_BACKOFF_BASE_S = 0.02
RETRY_BACKOFF_CAP_S = 0.25


def redis_retry(retries: int) -> Retry:
    """A synchronous client's retry policy: connection errors only, with backoff."""
    return Retry(
        ExponentialWithJitterBackoff(cap=RETRY_BACKOFF_CAP_S, base=RETRY_BACKOFF_BASE_S),
        retries,
        supported_errors=(redis.ConnectionError,),
    )


def redis_options(
    *,
    socket_timeout_s: float,
    connect_timeout_s: float,
    health_check_s: float,
    retries: int,
) -> dict[str, Any]:
    """Keyword arguments for ``redis.Redis.from_url`` / ``ConnectionPool.from_url``."""
    return {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": connect_timeout_s,
        "health_check_interval": health_check_s,
        "retry": redis_retry(retries),
    }


def redis_options_from_settings() -> dict[str, Any]:
    """``redis_options`` as Django's settings (``REDIS_*``) ask."""
    from django.conf import settings

    return redis_options(
        socket_timeout_s=settings.REDIS_SOCKET_TIMEOUT_SECONDS,
        connect_timeout_s=settings.REDIS_CONNECT_TIMEOUT_SECONDS,
        health_check_s=settings.REDIS_HEALTH_CHECK_SECONDS,
        retries=settings.REDIS_RETRIES,
    )
