"""Incremental detokenization: token ids in, safe text deltas out.

Three layers, each with one job:

- ``IncrementalDetokenizer`` turns ids into text without ever emitting part of a multi-byte
  character: a byte-level token may hold half a Chinese character, whose decode ends in
  U+FFFD; that text is held until a later token completes it. Invariant: the concatenation
  of ``push`` results and ``flush()`` equals ``tokenizer.decode(all ids, skip_special_tokens=True)``
  (for byte-level BPE, the GLM tokenizer's kind).
- ``StopStringFilter`` holds back any tail that could still become a stop string, and cuts
  the text at the first stop string (which is never emitted).
- ``OutputStream`` routes text between ``<think>``/``</think>`` to the reasoning channel and
  the rest to the answer channel; stop strings apply to the answer only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """vLLM/TGI-style offsets: decode a short window of context plus the new tokens.

    ``prefix_offset..read_offset`` is already-emitted context (decoded again so tokenizers
    whose decoding depends on neighbours stay right); ``read_offset..`` is not yet emitted.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly "")."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            delta = new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held (the stream ended); may end in U+FFFD if the bytes do."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]


class StopStringFilter:
    """Cuts text at the first stop string; holds back a tail that may start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Return the text now safe to emit. After a stop, returns "" forever."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buffer = self._held + text
        hits = [i for i in (buffer.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return buffer[: min(hits)]
        hold = self._longest_stop_prefix_suffix(buffer)
        self._held = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold]

    def flush(self) -> str:
        """The stream ended without a stop: the held tail is ordinary text."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_stop_prefix_suffix(self, buffer: str) -> int:
        best = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:size]):
                    best = size
                    break
        return best


@dataclass(frozen=True)
class TextDelta:
    text: str = ""
    reasoning: str = ""

    def __bool__(self) -> bool:
        return bool(self.text or self.reasoning)


class OutputStream:
    """Per-request output: answer/reasoning split, stop strings, reasoning token count.

    Think-tag tokens switch channel and produce no text. ``in_reasoning`` starts True when
    the prompt itself ends inside an open ``<think>``. EOS tokens must not be pushed.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        stop: Sequence[str] = (),
        think_start_id: int | None = None,
        think_end_id: int | None = None,
        in_reasoning: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self._think_start = think_start_id
        self._think_end = think_end_id
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stop = StopStringFilter(stop)
        self.in_reasoning = in_reasoning
        self.reasoning_tokens = 0

    @property
    def stopped(self) -> bool:
        return self._stop.stopped

    def push(self, token_id: int) -> TextDelta:
        if token_id in (self._think_start, self._think_end):
            # Finish the current channel's text before switching (a tag ends any character).
            delta = self._route(self._detok.flush())
            self._detok = IncrementalDetokenizer(self._tokenizer)
            self.reasoning_tokens += (
                1 if (self.in_reasoning or token_id == self._think_start) else 0
            )
            self.in_reasoning = token_id == self._think_start
            return delta
        if self.in_reasoning:
            self.reasoning_tokens += 1
        return self._route(self._detok.push(token_id))

    def finish(self) -> TextDelta:
        """End of stream (EOS or length): release held text (not after a stop string)."""
        delta = self._route(self._detok.flush())
        return TextDelta(text=delta.text + self._stop.flush(), reasoning=delta.reasoning)

    def _route(self, text: str) -> TextDelta:
        if not text:
            return TextDelta()
        if self.in_reasoning:
            return TextDelta(reasoning=text)
        return TextDelta(text=self._stop.feed(text))
