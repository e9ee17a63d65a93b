"""The answer: one type from the worker's events to every wire format.

``CompletionRun.events()`` yields the worker's own ``DeltaEvent`` (``inference.protocol``) for
each piece of text as it arrives, then one ``Answer``. Nothing re-wraps them on the way: the
REST response and the SSE chunks (``webplatform.api.openai_wire``) and the websocket frames
(``webplatform.chat.frames``) render these two types, and the answer cache stores the
``Answer`` as it is.
"""

from __future__ import annotations

from typing import TypeAlias

import msgspec

from inference.protocol import DeltaEvent, FinishReason, NoticeEvent, Usage


class Answer(msgspec.Struct, frozen=True):
    """A whole answer: its text, its reasoning (when thinking was on), why it ended, and the
    tokens it took (the worker's figures; a cached answer keeps those of its first run)."""

    text: str
    reasoning: str
    finish_reason: FinishReason
    usage: Usage


# What a run's stream yields: DeltaEvent items (and, rarely, a NoticeEvent saying why the
# answer is late: its worker died and another took it over), then exactly one Answer.
AnswerEvent: TypeAlias = DeltaEvent | NoticeEvent | Answer

__all__ = ["Answer", "AnswerEvent", "DeltaEvent", "NoticeEvent"]
