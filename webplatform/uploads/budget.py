"""How many pixels of one image a model sees: its pixel budget, per OpenAI ``detail``.

A GLM-4.6V image becomes one prompt token per 28 x 28 pixels (14 px patches merged 2 x 2),
so pixels are prompt length: a 12 MP phone photo at full size is ~15,000 image tokens, more
than a worker's context. Every image is therefore scaled down at validation to its model's
budget (``validation.image_validate``), before anything else heavy, and the request's
``detail`` picks the budget:

- ``auto`` (the default): ``image_pixel_budget`` of the model's spec in ``INFERENCE_MODELS``,
  else ``IMAGE_PIXEL_BUDGET`` (1,254,400 px = 1,600 tokens, e.g. 1,293 x 970 for a 4:3
  photo). Why that figure: small print is what the seed's use cases read (an expiry date,
  a clause). 6 pt type has a cap height of ~1.5 mm; on a label photographed to fill two
  thirds of a 4:3 frame's width (~10 cm of label across ~860 of the 1,293 px), that is
  ~13 px tall, above the ~10 px at which vision-language models and OCR start misreading
  characters; half the budget (~9 px) would fall below it, double would buy nothing a
  label needs while doubling prefill time;
- ``low``: ``image_pixel_budget_low`` of the spec, else ``IMAGE_PIXEL_BUDGET_LOW`` (200,704
  px = 256 tokens, 448 x 448): enough for "what is this", the cheapest prompt;
- ``high``: ``image_pixel_budget_high`` of the spec, else what the model's context leaves
  for one image: (``max_seq_len`` - ``IMAGE_BUDGET_TEXT_RESERVE`` tokens) x 784, capped by
  the model's own image processor limit (11.76 MP for GLM-4.6V).

A model kind without images in its prompt (``ocr-lite``) keeps the same budgets: they also
bound what the platform stores and ships per image.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings

from tenants.errors import ApplicationError

DETAILS = ("auto", "low", "high")
PIXELS_PER_TOKEN = 28 * 28
# The GLM-4.6V image processor's own maximum (longest_edge = 28 * 28 * 15000 pixels).
PROCESSOR_MAX_PIXELS = PIXELS_PER_TOKEN * 15_000
# The engine's default context per request (inference/engine/config.py, max_seq_len).
DEFAULT_MAX_SEQ_LEN = 8192


def image_pixel_budget(*, model: str, detail: str = "auto") -> int:
    """The pixel budget of one image of a request to ``model`` with ``detail``."""
    if detail not in DETAILS:
        raise ApplicationError(
            f"Invalid image detail '{detail}': use one of {', '.join(DETAILS)}.",
            code="invalid_request",
            param="detail",
        )
    spec: dict[str, Any] = dict(settings.INFERENCE_MODELS.get(model) or {})
    if detail == "low":
        return int(spec.get("image_pixel_budget_low") or settings.IMAGE_PIXEL_BUDGET_LOW)
    if detail == "high":
        if spec.get("image_pixel_budget_high"):
            return int(spec["image_pixel_budget_high"])
        max_seq_len = int(spec.get("max_seq_len") or DEFAULT_MAX_SEQ_LEN)
        tokens = max(max_seq_len - settings.IMAGE_BUDGET_TEXT_RESERVE, 256)
        return min(tokens * PIXELS_PER_TOKEN, PROCESSOR_MAX_PIXELS)
    return int(spec.get("image_pixel_budget") or settings.IMAGE_PIXEL_BUDGET)
