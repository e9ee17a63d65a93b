"""An inference client that says its request was taken over before answering it: what a
client sees when the worker running its request crashed and another took it over (the
Redis transport's claim, tests/inference/worker/test_redis_streams.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from inference.client import InferenceClient
from inference.protocol import TAKEN_OVER, Event, InferenceRequest, NoticeEvent


class TakenOverClient:
    """Delegates everything to ``inner``; ``submit`` yields the takeover notice first."""

    def __init__(self, inner: InferenceClient) -> None:
        self.inner = inner

    async def submit(self, request: InferenceRequest, **kwargs: Any) -> AsyncIterator[Event]:
        yield NoticeEvent.fixed(TAKEN_OVER)
        async for event in self.inner.submit(request, **kwargs):
            yield event

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
