"""Requests served by ``webplatform.asgi`` share the process's cache backends (opened at
import, in the context the server's tasks inherit) instead of each building its own."""

from __future__ import annotations

from tests.fresh_interpreter import python_json, web_env

_SERVE = """
import asyncio, json
import httpx
from webplatform.asgi import application
from django.core.cache import caches
from django.core.signals import request_started

seen = []
def receiver(**_):  # runs in the request's own thread, in the request's context
    seen.append(caches["default"])  # the object itself: no id reused after a free
request_started.connect(receiver)

async def get(c):
    return (await c.get("/health/live")).status_code

async def serve():
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        # Each request in a task of its own, as uvicorn serves them (httpx's transport
        # calls the application in the caller's task).
        return [await asyncio.create_task(get(c)) for _ in range(3)]

statuses = asyncio.run(serve())
process = caches["default"]
print(json.dumps({"statuses": statuses, "shared": [backend is process for backend in seen]}))
"""


def test_requests_share_the_process_cache_backend() -> None:
    report = python_json(_SERVE, env=web_env())
    assert report["statuses"] == [200, 200, 200]
    assert report["shared"] == [True, True, True]
