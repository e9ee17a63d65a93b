"""Which client serves which model: the worker transport (Redis Streams or in-process) for
the models this platform's workers run, an ``UpstreamClient`` for each model of kind
``openai-upstream`` (``inference.client.upstream``). The factory builds it when any model
is an upstream one; the request path talks to it as to any ``InferenceClient``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from typing import Any

from inference.client.base import InferenceClient, ModelHealth
from inference.client.upstream import UpstreamSpec, is_upstream_spec
from inference.protocol import Event, ImageRef, InferenceRequest
from inference.settings import InferenceSettings


class ModelDispatchClient(InferenceClient):
    """The worker transport for most models, an ``UpstreamClient`` for each upstream one."""

    def __init__(self, *, default: InferenceClient, upstreams: Mapping[str, InferenceClient]):
        self.default = default
        self.upstreams = dict(upstreams)
        self.settings = default.settings

    def client_for(self, model: str) -> InferenceClient:
        return self.upstreams.get(model, self.default)

    async def put_image(self, *, tenant_id: str, data: bytes, ref: ImageRef) -> None:
        # No model named: the transport's store (the request path calls put_model_image).
        await self.default.put_image(tenant_id=tenant_id, data=data, ref=ref)

    async def put_model_image(
        self, *, model: str, tenant_id: str, data: bytes, ref: ImageRef
    ) -> None:
        await self.client_for(model).put_image(tenant_id=tenant_id, data=data, ref=ref)

    def submit(
        self, request: InferenceRequest, *, time_limit_s: float | None = None
    ) -> AsyncIterator[Event]:
        return self.client_for(request.model).submit(request, time_limit_s=time_limit_s)

    async def cancel(self, request_id: str) -> None:
        for upstream in self.upstreams.values():
            await upstream.cancel(request_id)
        await self.default.cancel(request_id)

    async def model_health(self, model: str) -> ModelHealth:
        return await self.client_for(model).model_health(model)

    def stop_workers(self) -> None:
        stop = getattr(self.default, "stop_workers", None)
        if stop is not None:
            stop()

    def __getattr__(self, name: str) -> Any:
        # The transport's own extras (the in-process client's ``hub``, ``start``).
        if name == "default":
            raise AttributeError(name)
        return getattr(self.default, name)

    async def aclose(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.aclose()
        await self.default.aclose()


def split_upstream_models(
    settings: InferenceSettings,
) -> tuple[InferenceSettings, dict[str, UpstreamSpec]]:
    """The settings without the upstream models (for the worker transport), and those."""
    upstream = {
        name: UpstreamSpec.from_spec(name, spec)
        for name, spec in settings.models.items()
        if is_upstream_spec(spec)
    }
    local = {name: spec for name, spec in settings.models.items() if name not in upstream}
    return replace(settings, models=local), upstream
