"""Selectors over inference health for the web side (admission, degradation, /health/ready).

``ModelHealth`` (defined with the transports, re-exported here) is what a transport reports
for one model: live workers (fresh heartbeats), queue depth, running requests, capacity.
These selectors add the cross-model views; they only read.
"""

from __future__ import annotations

import asyncio

from inference.client import InferenceClient, get_inference_client
from inference.transports.base import ModelHealth

__all__ = ["ModelHealth", "model_health_get", "models_health_list", "models_ready"]


async def model_health_get(*, model: str, client: InferenceClient | None = None) -> ModelHealth:
    return await (client or get_inference_client()).model_health(model)


async def models_health_list(
    *, models: list[str] | None = None, client: InferenceClient | None = None
) -> list[ModelHealth]:
    """Health of ``models`` (default: every configured model), fetched concurrently."""
    client = client or get_inference_client()
    names = list(client.settings.models) if models is None else models
    return list(await asyncio.gather(*(client.model_health(name) for name in names)))


async def models_ready(*, client: InferenceClient | None = None) -> bool:
    """True when every configured model has at least one live worker."""
    return all(h.available for h in await models_health_list(client=client))
