"""Liveness and readiness probes.

``/health/live`` answers as long as the process serves HTTP. ``/health/ready`` answers 200
only when the database, Redis (in production mode) and at least one worker of every served
model answer; a load balancer takes the process out of rotation otherwise.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, JsonResponse

from inference.client import get_inference_client

logger = logging.getLogger(__name__)
# Every check runs at once, each cut off after this long: the probe answers within a second
# even when Redis is hung (its own calls time out sooner, REDIS_SOCKET_TIMEOUT_SECONDS).
_CHECK_TIMEOUT_SECONDS = 0.8


async def live(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


def _database_ok() -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        return cursor.fetchone() == (1,)


def _redis_ok() -> bool:
    if not settings.REDIS_URL:
        return True
    from django_redis import get_redis_connection

    return bool(get_redis_connection("default").ping())


Detail = dict[str, Any]


async def _check(name: str, coro: Awaitable[Detail]) -> tuple[str, Detail]:
    try:
        detail = await asyncio.wait_for(coro, timeout=_CHECK_TIMEOUT_SECONDS)
        return name, detail
    except Exception as exc:  # a probe reports failures; it never raises
        logger.warning("readiness check %s failed: %s", name, exc)
        return name, {"ok": False, "error": type(exc).__name__}


async def _bool_check(fn: Callable[[], bool]) -> Detail:
    return {"ok": bool(await sync_to_async(fn, thread_sensitive=False)())}


async def _model_check(model: str) -> Detail:
    health = await get_inference_client().model_health(model)
    return {
        "ok": health.live_workers > 0,
        "live_workers": health.live_workers,
        "queue_depth": health.queue_depth,
    }


async def ready(request: HttpRequest) -> JsonResponse:
    checks = [
        _check("database", _bool_check(_database_ok)),
        _check("redis", _bool_check(_redis_ok)),
        *[_check(f"model:{name}", _model_check(name)) for name in settings.INFERENCE_MODELS],
    ]
    results = dict(await asyncio.gather(*checks))
    ok = all(r.get("ok") for r in results.values())
    return JsonResponse(
        {"status": "ok" if ok else "unavailable", "checks": results}, status=200 if ok else 503
    )
