"""The inference side as the web side sees it: what a web process imports.

``InferenceClient`` (``base``) is the interface; ``redis_streams`` and ``inprocess`` implement
it; ``factory`` picks one from Django settings. The worker process imports nothing from here.
"""

from __future__ import annotations

from inference.client.base import InferenceClient, ModelHealth
from inference.client.factory import (
    build_inference_client,
    get_inference_client,
    inference_settings,
    reset_inference_client,
)

__all__ = [
    "InferenceClient",
    "ModelHealth",
    "build_inference_client",
    "get_inference_client",
    "inference_settings",
    "reset_inference_client",
]
