"""Schemathesis hooks for ``test_schemathesis`` (loaded through ``SCHEMATHESIS_HOOKS``).

The chat request has rules OpenAPI 3.0 cannot state (``webplatform.api.schema``,
``chat_request_rules``): the last message comes from the user, an image is one that
decodes, at most ``IMAGE_MAX_PER_REQUEST`` images, ``max_tokens`` within the plan. A
request that breaks one is answered 400 by design, so a *positive* case (one schemathesis
expects to be accepted) is brought within them here, changing only what those rules
govern and keeping it schema-valid. Negative cases are sent as generated.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from schemathesis import GenerationMode

# A 28x28 red PNG: decodes, passes the scanner, a handful of image tokens.
PNG_DATA_URI = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAABwAAAAcCAIAAAD9b0jDAAAAJ0lEQVR4nGM8oaHB"
    "QG3ARHUTRw0dNXTU0FFDRw0dNXTU0FFDB6WhADfRAVCaffPUAAAAAElFTkSuQmCC"
)
PLAN_MAX_OUTPUT_TOKENS = 4  # test_schemathesis's plan
MAX_IMAGES = 4  # IMAGE_MAX_PER_REQUEST's default


def _within_image_rules(parts: list[Any], images_left: int) -> int:
    for index, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") != "image_url":
            continue
        if images_left == 0:
            parts[index] = {"type": "text", "text": "and"}
            continue
        images_left -= 1
        image_url = part.get("image_url")
        if isinstance(image_url, str):
            part["image_url"] = PNG_DATA_URI
        elif isinstance(image_url, dict) and isinstance(image_url.get("url"), str):
            image_url["url"] = PNG_DATA_URI
    return images_left


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    meta = case.meta
    if (
        case.operation.path != "/v1/chat/completions"
        or meta is None
        or meta.generation.mode != GenerationMode.POSITIVE
        or not isinstance(case.body, dict)
    ):
        return case
    body = case.body
    images_left = MAX_IMAGES
    if isinstance(body.get("image"), str):
        body["image"] = PNG_DATA_URI
        images_left -= 1
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        for message in messages:
            if isinstance(message, dict) and isinstance(message.get("content"), list):
                images_left = _within_image_rules(message["content"], images_left)
        last = messages[-1]
        if not (isinstance(last, dict) and last.get("role") == "user"):
            messages.append({"role": "user", "content": "Describe it."})
    for name in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(name), int) and body[name] > PLAN_MAX_OUTPUT_TOKENS:
            body[name] = PLAN_MAX_OUTPUT_TOKENS
    return case
