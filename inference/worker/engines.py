"""Which engine serves a model: dispatch on the ``kind`` of its ``INFERENCE_MODELS`` spec.

``"glm4v"`` (the default) is the GLM-4.6V-Flash engine; ``"ocr-lite"`` is the CPU fallback
that answers from OCR text. Both honour the same ``add_request`` / ``abort`` / ``step``
interface, so the worker loop and the transports do not care which one they drive.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when the kind is known: an ocr-lite worker never loads torch
    from inference.engine import Engine, EngineConfig
    from inference.ocr_lite.engine import OcrLiteEngine


def engine_for_spec(
    spec: Mapping[str, Any], config: EngineConfig | None = None
) -> Engine | OcrLiteEngine:
    kind = spec.get("kind", "glm4v")
    if kind == "glm4v":
        from inference.engine import engine_from_spec

        return engine_from_spec(spec, config)
    if kind == "ocr-lite":
        from inference.ocr_lite import ocr_lite_engine_from_spec

        return ocr_lite_engine_from_spec(spec)
    raise ValueError(f"unknown engine kind {kind!r} (known: glm4v, ocr-lite)")
