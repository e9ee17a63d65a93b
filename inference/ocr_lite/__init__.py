"""``ocr-lite``: the degradation fallback model, answering on the CPU from the text an OCR
model reads in the images. Free of Django; the OCR model loads lazily, on first use."""

from __future__ import annotations

from inference.ocr_lite.engine import KIND, OcrLiteEngine, ocr_lite_engine_from_spec

__all__ = ["KIND", "OcrLiteEngine", "ocr_lite_engine_from_spec"]
