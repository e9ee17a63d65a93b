"""Incremental detokenization: token ids in, safe text deltas out.

Three layers, each with one job:

- ``IncrementalDetokenizer`` turns ids into text without ever emitting part of a multi-byte
  character: a byte-level token may hold half a Chinese character, whose decode ends in
  U+FFFD; that text is held until a later token completes it. Fast tokenizers do this in
  Rust (``tokenizers.decoders.DecodeStream``), others in Python. Invariant: the concatenation
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


def _rust_backend(tokenizer: Any) -> Any | None:
    """The ``tokenizers.Tokenizer`` that decodes exactly as ``tokenizer.decode`` does, or None.

    A transformers fast tokenizer decodes by calling its Rust tokenizer (``backend_tokenizer``)
    and then, only if asked, ``clean_up_tokenization``, which we never ask for. A subclass that
    overrides ``decode``/``_decode`` (Whisper's timestamps, CPM's spaces) changes the text, so
    it keeps the Python window decode, as does any tokenizer without a Rust backend.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer) or not isinstance(tokenizer, PreTrainedTokenizerFast):
        return None
    cls = type(tokenizer)
    if cls.decode is not PreTrainedTokenizerFast.decode:
        return None
    if cls._decode is not PreTrainedTokenizerFast._decode:
        return None
    return backend


class IncrementalDetokenizer:
    """vLLM/TGI-style offsets: decode a short window of context plus the new tokens.

    The window is ``context`` (the ids of the last emitted chunk, decoded again so tokenizers
    whose decoding depends on neighbours stay right) plus ``pending`` (ids not yet emitted).
    A chunk is emitted once the window decodes to more than its context and does not end in
    U+FFFD; the pending ids then become the context.

    Two implementations of that one rule: for a transformers fast tokenizer, the Rust
    ``tokenizers.decoders.DecodeStream`` (one Rust decode per token, no Python decode); for any
    other tokenizer, two ``tokenizer.decode`` calls per token. They return the same chunks. If
    ``DecodeStream`` refuses a window (its "invalid prefix" error: the window's text does not
    start with its context's, which byte-fallback tokens of invalid UTF-8 can cause and a
    byte-level BPE cannot), the rest of the stream takes the Python window decode, which
    slices without that check, rather than failing the request.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._backend = _rust_backend(tokenizer)
        self._stream = self._new_stream()
        self._context: list[int] = []
        self._pending: list[int] = []

    def _new_stream(self) -> Any | None:
        if self._backend is None:
            return None
        from tokenizers.decoders import DecodeStream

        return DecodeStream(skip_special_tokens=True)

    def _decode(self, ids: Sequence[int]) -> str:
        return str(
            self._tokenizer.decode(
                ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
        )

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly "")."""
        self._pending.append(token_id)
        if self._stream is not None:
            try:
                chunk = self._stream.step(self._backend, token_id)
            except Exception:  # tokenizers raises a bare Exception for an invalid prefix
                self._stream = None
                return self._push_window()
            if chunk is None:
                return ""
            self._context, self._pending = self._pending, []
            return str(chunk)
        return self._push_window()

    def _push_window(self) -> str:
        prefix_text = self._decode(self._context)
        new_text = self._decode(self._context + self._pending)
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            self._context, self._pending = self._pending, []
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held (the stream ended); may end in U+FFFD if the bytes do.

        Afterwards the detokenizer starts afresh, with no context.
        """
        context, pending = self._context, self._pending
        self._context, self._pending = [], []
        if self._stream is not None:
            self._stream = self._new_stream()
        if not pending:
            return ""
        prefix_text = self._decode(context)
        return self._decode(context + pending)[len(prefix_text) :]


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
class DecodedText:
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

    def push(self, token_id: int) -> DecodedText:
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

    def finish(self) -> DecodedText:
        """End of stream (EOS or length): release held text (not after a stop string)."""
        delta = self._route(self._detok.flush())
        return DecodedText(text=delta.text + self._stop.flush(), reasoning=delta.reasoning)

    def _route(self, text: str) -> DecodedText:
        if not text:
            return DecodedText()
        if self.in_reasoning:
            return DecodedText(reasoning=text)
        return DecodedText(text=self._stop.feed(text))
