"""ASGI entry point: HTTP through Django, websockets through Channels."""

from __future__ import annotations

import os

import django

from inference.allocator import (
    WEB_ARENA_MAX,
    WEB_TRIM_THRESHOLD_BYTES,
    freeze_loaded_objects,
    keep_freed_memory,
)

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webplatform.settings")
# Every upload allocates the same buffers again (its body, decoded bytes, image and pixels):
# reused from malloc's heap instead of faulted in anew each request (-1.3 ms of validation
# for a 520 px JPEG on this project's CPU, docs/benchmarks.md "Web process allocator").
# Before anything loads, so that what loads follows it too. (The embedded mode's engine
# loader then sets the engine's trim threshold over the web's; the web's cap of arenas
# stays: that process holds a model and serves the web with the same malloc.)
keep_freed_memory(trim_threshold=WEB_TRIM_THRESHOLD_BYTES, arena_max=WEB_ARENA_MAX)

# Django must be set up before anything imports models (the websocket routes do); what
# get_asgi_application() does, with the handler that runs Django's header-only middleware
# on the event loop (webplatform/middleware.py).
django.setup(set_prefix=False)

from webplatform.middleware import PlatformAsgiHandler  # noqa: E402

django_asgi_app = PlatformAsgiHandler()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from webplatform.after_response import AfterResponse  # noqa: E402
from webplatform.api.body_cap import caller_body_cap  # noqa: E402
from webplatform.asgi_limits import BodyLimits  # noqa: E402
from webplatform.chat.routing import websocket_urlpatterns  # noqa: E402
from webplatform.chat.security import websocket_stack  # noqa: E402


def _preload_embedded_models() -> None:
    """Embedded mode: load the in-process models at start, not on the first request."""
    from django.conf import settings

    if settings.INFERENCE_TRANSPORT == "inprocess" and settings.INFERENCE_PRELOAD:
        from inference.client import get_inference_client

        client = get_inference_client()
        start = getattr(client, "start", None)
        if start is not None:
            start()


_preload_embedded_models()

application = ProtocolTypeRouter(
    {
        # Bodies bounded in size and time before Django buffers them (asgi_limits.py), in
        # size by the caller's plan where the route's cap depends on it (api/body_cap.py).
        # After the response: what a request owes that its client does not wait for
        # (after_response.py: a served answer's usage record).
        "http": AfterResponse(BodyLimits(django_asgi_app, caller_cap=caller_body_cap)),
        "websocket": websocket_stack(URLRouter(websocket_urlpatterns)),
    }
)


def _load_routes() -> None:
    """Build the URL resolver now (Django builds it on the first request), so that what it
    creates is frozen with the rest."""
    from django.urls import get_resolver

    get_resolver().url_patterns  # noqa: B018 - the property builds and caches the patterns


_load_routes()


def _share_cache_connections() -> None:
    """Open every configured cache here, in the context the server's tasks are made from.

    Django keeps its cache backends in an asgiref ``Local``, which under ASGI is per task:
    without this, every request built its own backend on its first cache call (for
    django-redis a client object, its serializer and compressor looked up, a Redis client
    with its ~200 response callbacks copied: ~0.2 ms a request, docs/benchmarks.md
    "Cache backend per request") and dropped it at its end. A backend opened here is
    inherited by every request's context instead; django-redis's client and LocMemCache
    are thread-safe, and their connections stay pooled as before."""
    from django.conf import settings
    from django.core.cache import caches

    for alias in settings.CACHES:
        caches[alias]  # opening the backend is the point


_share_cache_connections()
# Everything loaded so far lives as long as the process (Django, DRF, the settings, the
# routes; in the embedded mode the model too): out of the cyclic collector's way, so a full
# collection does not stop the event loop for tens of ms (docs/benchmarks.md,
# "Garbage-collector pause").
freeze_loaded_objects()
