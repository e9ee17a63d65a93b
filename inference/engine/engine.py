"""The serving engine: continuous batching over a ``ModelRunner``. Pure logic, no IO.

One ``step()``:

1. takes in requests and aborts that arrived since the last step (``add_request`` and
   ``abort`` only queue work under a lock, so another thread may call them);
2. ends cancelled requests (frees their slots; ``DoneEvent(CANCELLED)``);
3. admits up to ``prefills_per_step`` waiting requests, fair across tenants
   (``FairQueue``), while a slot is free and the batch is below ``max_batch_size``: builds
   the prompt, prefills it alone into its slot, samples and streams its first token;
4. runs one decode forward for every running request (newly admitted included), samples
   one token each and streams it.

Events come back in order per request: ``StartEvent``, ``DeltaEvent``\\*, then one
``DoneEvent`` or ``ErrorEvent``. A problem with one request (bad image, prompt too long,
an exception or out-of-memory in its prefill) ends only that request. An exception in the
shared decode forward ends the requests of that batch; the engine itself keeps serving.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from inference.engine.detokenizer import OutputStream, TextDelta
from inference.engine.prompt import PromptError
from inference.engine.runner import ModelRunner
from inference.engine.sampling import RowSampler, sample
from inference.engine.scheduler import FairQueue
from inference.engine.sequence import Sequence
from inference.protocol import (
    DeltaEvent,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    Event,
    FinishReason,
    InferenceRequest,
    StartEvent,
)

logger = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    max_batch_size: int = 8  # running requests sharing one decode forward
    max_seq_len: int = 4096  # KV capacity per slot: prompt + completion tokens
    num_slots: int | None = None  # KV slots allocated; defaults to max_batch_size
    prefills_per_step: int = 1  # bounds how long one step stalls running streams
    tps_window_s: float = 10.0  # window of EngineStats.tokens_per_second
    # Called with (request_id, token_id) for every sampled token, EOS included: for tests
    # and tracing (events carry text, not ids).
    token_observer: Callable[[str, int], None] | None = None

    def __post_init__(self) -> None:
        if self.num_slots is None:
            self.num_slots = self.max_batch_size
        if min(self.max_batch_size, self.num_slots, self.prefills_per_step) < 1:
            raise ValueError("max_batch_size, num_slots and prefills_per_step must be >= 1")
        if self.max_seq_len < 2:
            raise ValueError("max_seq_len must be >= 2")


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    max_batch_size: int
    kv_used_tokens: int
    kv_capacity_tokens: int
    tokens_per_second: float
    device: str
    memory_bytes: int


class Engine:
    """Continuous-batching engine. ``step()`` must be called from one thread at a time."""

    def __init__(self, runner: ModelRunner, config: EngineConfig) -> None:
        self.runner = runner
        self.config = config
        self._slots_total = int(config.num_slots or config.max_batch_size)
        self._batch_limit = min(config.max_batch_size, self._slots_total)
        self.cache = runner.allocate_cache(num_slots=self._slots_total, max_len=config.max_seq_len)
        self._free_slots = list(range(self._slots_total))  # min-heap: low slots keep rows 0..B-1
        self._queue: FairQueue[Sequence] = FairQueue()
        self._running: dict[str, Sequence] = {}
        self._lock = threading.Lock()  # guards the three below
        self._inbox: list[Sequence] = []
        self._aborts: set[str] = set()
        self._known: set[str] = set()  # ids queued or running, for duplicate detection
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) per step
        self._step_tokens = 0

    # ------------------------------------------------------------------ public API
    def add_request(self, request: InferenceRequest, images: Mapping[str, bytes]) -> None:
        """Queue ``request``; its events come from later ``step()`` calls.

        ``images`` maps the sha256 of every ``ImageRef`` in the request to its bytes.
        Raises ValueError only for a request id already queued or running.
        """
        sequence = Sequence(
            request=request, images=dict(images), sampler=RowSampler.for_params(request.sampling)
        )
        with self._lock:
            if request.request_id in self._known:
                raise ValueError(f"duplicate request id {request.request_id}")
            self._known.add(request.request_id)
            self._inbox.append(sequence)

    def abort(self, request_id: str) -> None:
        """Cancel a queued or running request: next step frees its slot and emits
        ``DoneEvent(CANCELLED)``. Unknown or finished ids are ignored."""
        with self._lock:
            if request_id in self._known:
                self._aborts.add(request_id)

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._known)

    def stats(self) -> EngineStats:
        with self._lock:
            inbox = len(self._inbox)
        running = list(self._running.values())  # a snapshot: a heartbeat thread may call this
        return EngineStats(
            running=len(running),
            waiting=len(self._queue) + inbox,
            max_batch_size=self._batch_limit,
            kv_used_tokens=sum(s.cached_len for s in running),
            kv_capacity_tokens=self._slots_total * self.config.max_seq_len,
            tokens_per_second=self._tokens_per_second(),
            device=self.runner.device_name,
            memory_bytes=self.runner.memory_bytes(self.cache),
        )

    def step(self) -> list[tuple[str, Event]]:
        events: list[tuple[str, Event]] = []
        with self._lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, set()
        for sequence in inbox:
            self._queue.push(sequence.request.tenant_id, sequence, sequence.request.priority)
        self._cancel(aborts, events)
        self._step_tokens = 0
        self._admit(events)
        if self._running:
            self._decode(events)
        self._recent.append((time.monotonic(), self._step_tokens))
        self._trim_recent()
        return events

    # ------------------------------------------------------------------ steps
    def _cancel(self, request_ids: set[str], events: list[tuple[str, Event]]) -> None:
        if not request_ids:
            return
        for request_id in request_ids & self._running.keys():
            self._finish(self._running[request_id], FinishReason.CANCELLED, events, flush=False)
        for sequence in self._queue.remove(lambda s: s.request_id in request_ids):
            self._finish(sequence, FinishReason.CANCELLED, events, flush=False)

    def _admit(self, events: list[tuple[str, Event]]) -> None:
        budget = self.config.prefills_per_step
        while budget and self._free_slots and len(self._running) < self._batch_limit:
            sequence = self._queue.pop()
            if sequence is None:
                return
            if self._prefill(sequence, events):
                budget -= 1

    def _prefill(self, seq: Sequence, events: list[tuple[str, Event]]) -> bool:
        """Admit one request; return whether a prefill forward ran."""
        request = seq.request
        if request.deadline is not None and time.time() > request.deadline:
            self._fail(seq, ErrorCode.TIMEOUT, "deadline passed before start", events)
            return False
        try:
            prompt = self.runner.prepare(
                request.messages, seq.images or {}, thinking=request.sampling.thinking
            )
        except PromptError as exc:
            self._fail(seq, exc.code, exc.message, events)
            return False
        except Exception as exc:
            logger.exception("building prompt of %s failed", seq.request_id)
            self._fail(seq, ErrorCode.INTERNAL_ERROR, f"prompt processing failed: {exc}", events)
            return False
        seq.images = None
        if prompt.length >= self.config.max_seq_len:
            message = (
                f"prompt is {prompt.length} tokens ({prompt.image_tokens} for images); "
                f"this worker holds at most {self.config.max_seq_len} tokens per request "
                "including at least one completion token"
            )
            self._fail(seq, ErrorCode.CONTEXT_LENGTH_EXCEEDED, message, events)
            return False
        seq.slot = heapq.heappop(self._free_slots)
        try:
            result = self.runner.prefill(prompt)
            self.cache.write_prompt(seq.slot, result.kv)
            result.kv.clear()  # the slot holds it now; free the DynamicCache tensors
        except torch.OutOfMemoryError:
            self._release_memory()
            self._fail(seq, ErrorCode.OUT_OF_MEMORY, "out of memory during prefill", events)
            return True
        except Exception as exc:
            logger.exception("prefill of %s failed", seq.request_id)
            self._fail(seq, ErrorCode.INTERNAL_ERROR, f"prefill failed: {exc}", events)
            return True
        seq.prompt_tokens = prompt.length
        seq.image_tokens = prompt.image_tokens
        seq.cached_len = prompt.length
        seq.rope_delta = result.rope_delta
        seq.output = self._output_stream(request, prompt.input_ids[0].tolist())
        self._running[seq.request_id] = seq
        events.append((seq.request_id, StartEvent(prompt.length, prompt.image_tokens)))
        first = sample(result.logits.view(1, -1), [seq.sampler])[0]
        self._on_token(seq, first, events)
        return True

    def _decode(self, events: list[tuple[str, Event]]) -> None:
        rows = sorted(self._running.values(), key=lambda s: s.slot)
        try:
            logits = self.runner.decode(
                self.cache,
                slots=[s.slot for s in rows],
                token_ids=[s.next_token for s in rows],
                positions=[s.cached_len for s in rows],
                rope_deltas=[s.rope_delta for s in rows],
            )
            tokens = sample(logits, [s.sampler for s in rows])
        except torch.OutOfMemoryError:
            self._release_memory()
            for seq in rows:
                self._fail(seq, ErrorCode.OUT_OF_MEMORY, "out of memory during decode", events)
            return
        except Exception as exc:
            logger.exception("decode step failed for %d requests", len(rows))
            for seq in rows:
                self._fail(seq, ErrorCode.INTERNAL_ERROR, f"decode failed: {exc}", events)
            return
        for seq, token in zip(rows, tokens, strict=True):
            seq.cached_len += 1
            self._on_token(seq, token, events)

    # ------------------------------------------------------------------ per-token output
    def _output_stream(self, request: InferenceRequest, prompt_ids: list[int]) -> OutputStream:
        special = self.runner.special
        return OutputStream(
            self.runner.tokenizer,
            stop=request.sampling.stop,
            think_start_id=special.think_start_id,
            think_end_id=special.think_end_id,
            in_reasoning=_ends_inside_think(
                prompt_ids, special.think_start_id, special.think_end_id
            ),
        )

    def _on_token(self, seq: Sequence, token: int, events: list[tuple[str, Event]]) -> None:
        seq.generated += 1
        seq.undelivered_tokens += 1
        self._step_tokens += 1
        seq.next_token = token
        if self.config.token_observer is not None:
            self.config.token_observer(seq.request_id, token)
        assert seq.output is not None
        if token in self.runner.special.eos_ids:
            self._finish(seq, FinishReason.STOP, events, flush=True)
            return
        delta = seq.output.push(token)
        if seq.output.stopped:
            self._finish(seq, FinishReason.STOP, events, flush=False, delta=delta)
        elif (
            seq.generated >= seq.request.sampling.max_tokens
            or seq.prompt_tokens + seq.generated >= self.config.max_seq_len
        ):
            self._finish(seq, FinishReason.LENGTH, events, flush=True, delta=delta)
        elif delta:
            self._emit_delta(seq, delta, events)

    def _emit_delta(self, seq: Sequence, delta: TextDelta, events: list[tuple[str, Event]]) -> None:
        event = DeltaEvent(
            text=delta.text, reasoning=delta.reasoning, tokens=seq.undelivered_tokens
        )
        events.append((seq.request_id, event))
        seq.undelivered_tokens = 0
        seq.streamed = True

    # ------------------------------------------------------------------ endings
    def _finish(
        self,
        seq: Sequence,
        reason: FinishReason,
        events: list[tuple[str, Event]],
        *,
        flush: bool,
        delta: TextDelta | None = None,
    ) -> None:
        delta = delta or TextDelta()
        if flush and seq.output is not None:
            tail = seq.output.finish()
            delta = TextDelta(delta.text + tail.text, delta.reasoning + tail.reasoning)
        if delta:
            self._emit_delta(seq, delta, events)
        events.append((seq.request_id, DoneEvent(finish_reason=reason, usage=seq.usage())))
        self._release(seq)

    def _fail(
        self, seq: Sequence, code: ErrorCode, message: str, events: list[tuple[str, Event]]
    ) -> None:
        # Out of memory is worth retrying elsewhere; only if nothing was streamed yet.
        retryable = code == ErrorCode.OUT_OF_MEMORY and not seq.streamed
        events.append((seq.request_id, ErrorEvent(code=code, message=message, retryable=retryable)))
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        self._running.pop(seq.request_id, None)
        if seq.slot >= 0:
            heapq.heappush(self._free_slots, seq.slot)
            seq.slot = -1
        with self._lock:
            self._known.discard(seq.request_id)

    def _release_memory(self) -> None:
        if self.runner.device.type == "cuda":
            torch.cuda.empty_cache()

    def _trim_recent(self) -> None:
        now = time.monotonic()
        while self._recent and now - self._recent[0][0] > self.config.tps_window_s:
            self._recent.popleft()

    def _tokens_per_second(self) -> float:
        # Called from the worker's heartbeat thread too: work on a snapshot.
        recent = list(self._recent)
        now = time.monotonic()
        recent = [(t, n) for t, n in recent if now - t <= self.config.tps_window_s]
        if len(recent) < 2:
            return 0.0
        span = now - recent[0][0]
        return sum(n for _, n in recent[1:]) / span if span > 0 else 0.0


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


_SPEC_CONFIG_KEYS = ("max_batch_size", "max_seq_len", "num_slots", "prefills_per_step")


def engine_from_spec(spec: Mapping[str, Any], config: EngineConfig | None = None) -> Engine:
    """Load the model named by ``spec`` (see ``ModelSpec``) and build an engine around it.

    Without ``config``, engine limits may come from the spec itself (``max_batch_size``,
    ``max_seq_len``, ``num_slots``, ``prefills_per_step``), else the defaults.
    """
    if config is None:
        config = EngineConfig(**{k: int(spec[k]) for k in _SPEC_CONFIG_KEYS if k in spec})
    return Engine(ModelRunner.from_spec(spec), config)
