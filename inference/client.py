"""The inference client the web side calls: one interface, two transports.

``get_inference_client()`` returns the process's client, chosen by
``settings.INFERENCE_TRANSPORT``: ``"redis"`` (Redis Streams, separate worker processes) or
``"inprocess"`` (embedded mode: the same worker loop in a thread of this process). The
client is created on first use and kept for the life of the process;
``reset_inference_client()`` drops it (tests, settings changes).

Usage (from async code)::

    client = get_inference_client()
    await client.put_image(tenant_id=tenant_id, data=image_bytes, ref=image_ref)
    async for event in client.submit(request):
        ...  # StartEvent, DeltaEvent..., then exactly one DoneEvent or ErrorEvent

Leaving the ``async for`` early (the caller went away) cancels the request.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import AsyncIterator
from typing import Any

from inference.protocol import Event, ImageRef, InferenceRequest
from inference.transports.base import InferenceSettings, ModelHealth

__all__ = [
    "InferenceClient",
    "ModelHealth",
    "get_inference_client",
    "inference_settings",
    "reset_inference_client",
]


class InferenceClient(abc.ABC):
    """What the web side needs from the inference service. All methods are coroutines."""

    settings: InferenceSettings

    @abc.abstractmethod
    async def put_image(self, *, tenant_id: str, data: bytes, ref: ImageRef) -> None:
        """Store validated image bytes under ``(tenant_id, ref.sha256)`` with the blob TTL.

        Idempotent: storing the same image again only refreshes its TTL. Raises
        ``inference.blobs.BlobDigestMismatch`` (a ``ValueError``) if ``data`` does not
        hash to ``ref.sha256``. Call before ``submit`` for every image the request refers to.
        """

    @abc.abstractmethod
    def submit(
        self, request: InferenceRequest, *, time_limit_s: float | None = None
    ) -> AsyncIterator[Event]:
        """Enqueue ``request`` and yield its events until the terminal one.

        Always ends with exactly one ``DoneEvent`` or ``ErrorEvent``: problems (unknown
        model, missing image, worker lost, no answer within ``time_limit_s`` seconds — default
        ``INFERENCE_REQUEST_TIMEOUT_SECONDS``) arrive as an ``ErrorEvent``, not an exception.
        Broker outages raise (``redis.RedisError``). If the caller stops iterating before
        the terminal event, the request is cancelled.
        """

    @abc.abstractmethod
    async def cancel(self, request_id: str) -> None:
        """Mark the request cancelled; its worker frees the slot at its next step and
        reports ``DoneEvent(CANCELLED)``. Harmless for unknown or finished requests."""

    @abc.abstractmethod
    async def model_health(self, model: str) -> ModelHealth:
        """Live workers, queue depth, running requests and capacity of ``model``."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, default does nothing
        """Release connections / stop workers of this client (tests, shutdown)."""


def inference_settings() -> InferenceSettings:
    """Read the inference settings from Django settings (the only place that does)."""
    from django.conf import settings

    return InferenceSettings(
        transport=settings.INFERENCE_TRANSPORT,
        redis_url=settings.INFERENCE_REDIS_URL,
        key_prefix=getattr(settings, "INFERENCE_KEY_PREFIX", "inference"),
        models=dict(settings.INFERENCE_MODELS),
        blob_ttl_s=settings.INFERENCE_BLOB_TTL_SECONDS,
        reply_ttl_s=settings.INFERENCE_REPLY_TTL_SECONDS,
        claim_idle_ms=settings.INFERENCE_CLAIM_IDLE_MS,
        heartbeat_s=settings.INFERENCE_HEARTBEAT_SECONDS,
        request_timeout_s=getattr(settings, "INFERENCE_REQUEST_TIMEOUT_SECONDS", 600.0),
        max_deliveries=getattr(settings, "INFERENCE_MAX_DELIVERIES", 3),
    )


def build_inference_client(settings: InferenceSettings, **kwargs: Any) -> InferenceClient:
    """A new client for ``settings`` (``kwargs`` go to the in-process client)."""
    if settings.transport == "redis":
        from inference.transports.redis_streams import RedisStreamsClient

        return RedisStreamsClient(settings=settings)
    if settings.transport == "inprocess":
        from inference.transports.inprocess import InProcessClient

        return InProcessClient(settings=settings, **kwargs)
    raise ValueError(f"unknown INFERENCE_TRANSPORT {settings.transport!r}")


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
