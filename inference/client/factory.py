"""The process's inference client: built from Django settings, once.

``get_inference_client()`` returns the process's client, chosen by
``settings.INFERENCE_TRANSPORT``: ``"redis"`` (Redis Streams, separate worker processes) or
``"inprocess"`` (embedded mode: the same worker loop in a thread of this process). The
client is created on first use and kept for the life of the process;
``reset_inference_client()`` drops it (tests, settings changes). ``inference_settings()`` is
the one place the web side reads the inference settings.
"""

from __future__ import annotations

import threading
from typing import Any

from inference.client.base import InferenceClient
from inference.client.dispatch import ModelDispatchClient, split_upstream_models
from inference.client.inprocess import InProcessClient
from inference.client.redis_streams import RedisStreamsClient
from inference.client.upstream import UpstreamClient
from inference.settings import InferenceSettings


def inference_settings() -> InferenceSettings:
    """Read the inference settings from Django settings (the only place that does)."""
    from django.conf import settings

    return InferenceSettings(
        transport=settings.INFERENCE_TRANSPORT,
        redis_url=settings.INFERENCE_REDIS_URL,
        key_prefix=settings.INFERENCE_KEY_PREFIX,
        models=dict(settings.INFERENCE_MODELS),
        blob_ttl_s=settings.INFERENCE_BLOB_TTL_SECONDS,
        reply_ttl_s=settings.INFERENCE_REPLY_TTL_SECONDS,
        claim_idle_ms=settings.INFERENCE_CLAIM_IDLE_MS,
        heartbeat_s=settings.INFERENCE_HEARTBEAT_SECONDS,
        health_cache_s=settings.INFERENCE_HEALTH_CACHE_SECONDS,
        request_timeout_s=settings.INFERENCE_REQUEST_TIMEOUT_SECONDS,
        max_deliveries=settings.INFERENCE_MAX_DELIVERIES,
        redis_socket_timeout_s=settings.REDIS_SOCKET_TIMEOUT_SECONDS,
        redis_connect_timeout_s=settings.REDIS_CONNECT_TIMEOUT_SECONDS,
        redis_health_check_s=settings.REDIS_HEALTH_CHECK_SECONDS,
        redis_retries=settings.REDIS_RETRIES,
    )


def build_inference_client(settings: InferenceSettings, **kwargs: Any) -> InferenceClient:
    """A new client for ``settings`` (``kwargs`` go to the in-process client).

    Models of kind ``openai-upstream`` are served by an ``UpstreamClient`` each
    (``inference.client.upstream``), the others by the transport.
    """
    local, upstreams = split_upstream_models(settings)
    client: InferenceClient
    if settings.transport == "redis":
        client = RedisStreamsClient(settings=local)
    elif settings.transport == "inprocess":
        client = InProcessClient(settings=local, **kwargs)
    else:
        raise ValueError(f"unknown INFERENCE_TRANSPORT {settings.transport!r}")
    if not upstreams:
        return client
    return ModelDispatchClient(
        default=client,
        upstreams={n: UpstreamClient(settings=settings, spec=s) for n, s in upstreams.items()},
    )


_lock = threading.Lock()
_client: InferenceClient | None = None


def get_inference_client() -> InferenceClient:
    """The process's inference client, created on first use (thread-safe)."""
    global _client
    if _client is None:
        with _lock:
            if _client is None:
                _client = build_inference_client(inference_settings())
    return _client


def reset_inference_client() -> InferenceClient | None:
    """Forget the process's client and return it, so the caller can ``aclose()`` it.

    The in-process client's worker threads are stopped here already (they are not bound
    to an event loop); a Redis client's pools close with their loops.
    """
    global _client
    with _lock:
        client, _client = _client, None
    stop = getattr(client, "stop_workers", None)
    if stop is not None:
        stop()
    return client
