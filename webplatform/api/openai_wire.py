"""OpenAI wire objects for chat completions: the response, its chunks, and SSE framing,
made from the one answer type (``webplatform.completions.answer``).

Shapes follow the OpenAI API exactly (the official SDKs parse them):
``chat.completion`` for a whole answer and ``chat.completion.chunk`` for streaming, with a
first chunk that carries the role, content chunks, a final chunk with ``finish_reason``, an
optional usage chunk with empty ``choices``, then ``data: [DONE]``.
"""

from __future__ import annotations

import json
from typing import Any

from inference.protocol import FinishReason, Usage
from webplatform.completions.answer import Answer


def _finish_reason(reason: FinishReason) -> str:
    # OpenAI has no "cancelled"; a stream the client stopped ends as "stop".
    return "length" if reason is FinishReason.LENGTH else "stop"


def usage_object(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "image_tokens": usage.image_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


def completion_object(
    *, request_id: str, model: str, created: int, answer: Answer
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": answer.text, "refusal": None}
    if answer.reasoning:
        message["reasoning_content"] = answer.reasoning
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": _finish_reason(answer.finish_reason),
            }
        ],
        "usage": usage_object(answer.usage),
    }


def chunk_object(
    *,
    request_id: str,
    model: str,
    created: int,
    delta: dict[str, Any] | None = None,
    finish_reason: FinishReason | None = None,
    usage: dict[str, Any] | None = None,
    with_usage_field: bool = False,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": []
        if delta is None
        else [
            {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": None if finish_reason is None else _finish_reason(finish_reason),
            }
        ],
    }
    if with_usage_field:
        # With include_usage, OpenAI sends "usage": null on every chunk but the last.
        chunk["usage"] = usage
    return chunk


def stream_error_object() -> dict[str, Any]:
    """The in-band error event for a stream that failed on our side after its headers."""
    return {
        "error": {
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }


def sse(data: dict[str, Any] | str) -> bytes:
    payload = (
        data
        if isinstance(data, str)
        else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    )
    return f"data: {payload}\n\n".encode()


SSE_DONE = sse("[DONE]")
