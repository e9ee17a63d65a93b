"""Per-request events: sampled tokens in, ``DeltaEvent``/``DoneEvent``/``ErrorEvent`` out.

Events come back in order per request: ``StartEvent``, ``DeltaEvent``\\*, then one
``DoneEvent`` or ``ErrorEvent``; after the terminal event ``release`` is called exactly once
(it frees the request's slot and forgets it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from inference.engine.detokenizer import DecodedText, OutputStream
from inference.engine.sequence import Sequence
from inference.protocol import (
    DeltaEvent,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    Event,
    FinishReason,
    StartEvent,
)

Events = list[tuple[str, Event]]


class RequestOutputs:
    """Turns tokens into events for every request of one engine. Engine thread only."""

    def __init__(
        self,
        runner: Any,
        *,
        max_seq_len: int,
        release: Callable[[Sequence], None],
        token_observer: Callable[[str, int], None] | None = None,
    ) -> None:
        self._tokenizer = runner.tokenizer
        self._special = runner.special
        self._max_seq_len = max_seq_len
        self._release = release
        self._observer = token_observer
        self.step_tokens = 0  # tokens sampled since the engine last reset it

    def start(self, seq: Sequence, prompt_ids: list[int], events: Events) -> None:
        """The prompt is in the cache: open the output stream and send ``StartEvent``."""
        special = self._special
        seq.output = OutputStream(
            self._tokenizer,
            stop=seq.request.sampling.stop,
            think_start_id=special.think_start_id,
            think_end_id=special.think_end_id,
            in_reasoning=_ends_inside_think(
                prompt_ids, special.think_start_id, special.think_end_id
            ),
        )
        events.append((seq.request_id, StartEvent(seq.prompt_tokens, seq.image_tokens)))

    def on_token(self, seq: Sequence, token: int, events: Events) -> None:
        seq.generated += 1
        seq.undelivered_tokens += 1
        self.step_tokens += 1
        seq.next_token = token
        if self._observer is not None:
            self._observer(seq.request_id, token)
        assert seq.output is not None
        if token in self._special.eos_ids:
            self.finish(seq, FinishReason.STOP, events, flush=True)
            return
        delta = seq.output.push(token)
        if seq.output.stopped:
            self.finish(seq, FinishReason.STOP, events, flush=False, delta=delta)
        elif (
            seq.generated >= seq.request.sampling.max_tokens
            or seq.prompt_tokens + seq.generated >= self._max_seq_len
        ):
            self.finish(seq, FinishReason.LENGTH, events, flush=True, delta=delta)
        elif delta:
            self._emit_delta(seq, delta, events)

    def finish(
        self,
        seq: Sequence,
        reason: FinishReason,
        events: Events,
        *,
        flush: bool,
        delta: DecodedText | None = None,
    ) -> None:
        delta = delta or DecodedText()
        if flush and seq.output is not None:
            tail = seq.output.finish()
            delta = DecodedText(delta.text + tail.text, delta.reasoning + tail.reasoning)
        if delta:
            self._emit_delta(seq, delta, events)
        events.append((seq.request_id, DoneEvent(finish_reason=reason, usage=seq.usage())))
        self._release(seq)

    def fail(self, seq: Sequence, code: ErrorCode, message: str, events: Events) -> None:
        # Out of memory is worth retrying elsewhere; only if nothing was streamed yet.
        retryable = code == ErrorCode.OUT_OF_MEMORY and not seq.streamed
        events.append((seq.request_id, ErrorEvent(code=code, message=message, retryable=retryable)))
        self._release(seq)

    def _emit_delta(self, seq: Sequence, delta: DecodedText, events: Events) -> None:
        event = DeltaEvent(
            text=delta.text, reasoning=delta.reasoning, tokens=seq.undelivered_tokens
        )
        events.append((seq.request_id, event))
        seq.undelivered_tokens = 0
        seq.streamed = True


def _ends_inside_think(prompt_ids: list[int], start: int | None, end: int | None) -> bool:
    """True when the prompt's last think tag is an opening one (template pre-opened it)."""
    if start is None:
        return False
    for token in reversed(prompt_ids):
        if token == start:
            return True
        if token == end:
            return False
    return False
