"""Serving engine for the GLM-4.6V-Flash family: scheduler, model runner, detokenizer.

Pure logic: no Django, no Redis. The worker process is the IO loop around ``Engine``.
Names are imported lazily so that importing this package does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Engine": "inference.engine.engine",
    "EngineConfig": "inference.engine.engine",
    "EngineStats": "inference.engine.engine",
    "GlmEngineStats": "inference.engine.engine",
    "config_from_spec": "inference.engine.engine",
    "engine_from_spec": "inference.engine.engine",
    "ModelRunner": "inference.engine.runner",
    "ModelSpec": "inference.engine.runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
