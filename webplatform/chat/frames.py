"""The websocket chat's server frames, made from the one answer type.

``start`` (request id, model), a ``delta`` per ``DeltaEvent`` (text, reasoning), ``done``
(finish reason, usage) from the ``Answer``; ``error_frame`` is the one way an
``ApplicationError`` is told on a websocket. ``ready`` opens a connection.
"""

from __future__ import annotations

from typing import Any

from inference.protocol import DeltaEvent, NoticeEvent
from tenants.errors import ApplicationError
from webplatform.completions.answer import Answer

Frame = dict[str, Any]


def error_frame(exc: ApplicationError) -> Frame:
    return {"type": "error", "code": exc.code, "message": exc.message, "param": exc.param}


def ready_frame(*, conversation_id: str | None, models: list[str]) -> Frame:
    return {"type": "ready", "conversation_id": conversation_id, "models": models}


def start_frame(*, request_id: str, model: str) -> Frame:
    return {"type": "start", "request_id": request_id, "model": model}


def notice_frame(event: NoticeEvent) -> Frame:
    """Why the answer is late (``inference.protocol.NOTICE_MESSAGES``); it goes on after."""
    return {"type": "notice", "code": event.code, "message": event.message}


def delta_frame(event: DeltaEvent) -> Frame:
    return {"type": "delta", "text": event.text, "reasoning": event.reasoning}


def done_frame(
    answer: Answer, *, request_id: str, cache_hit: bool, conversation_id: str | None
) -> Frame:
    usage = answer.usage
    return {
        "type": "done",
        "request_id": request_id,
        # As the worker said it, "cancelled" included (the REST API has no such value).
        "finish_reason": answer.finish_reason.value,
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "image_tokens": usage.image_tokens,
        },
        "cache_hit": cache_hit,
        "conversation_id": conversation_id,
    }
