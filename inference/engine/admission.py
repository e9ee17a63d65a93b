"""Waiting requests on their way to a KV slot: fair queue, image preprocessing, prompt check.

Order of a waiting request's life (each request leaves at most once, in queue order):

1. ``FairQueue``: round-robin across tenants (see ``scheduler``);
2. preparing: popped from the queue a few places before its turn (``preprocess_ahead``) and
   its images handed to the ``Preprocessor`` thread pool, so decoding and resizing happen
   while other requests decode. With ``preprocess_threads=0`` requests are popped only
   when they can be admitted, and prepared inline;
3. ``take``: the oldest prepared requests get their prompt built (template + tokenizer),
   their deadline and KV budget checked: prompt + ``max_tokens`` must fit one slot, else
   ``context_length_exceeded`` at once. A request that fails here never holds a slot.

When streams are running, ``take`` does not wait for unfinished preprocessing (the request
is admitted a step later); when the engine is idle it waits, since nothing stalls (and the
requests admitted together share one vision pass).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import wait
from typing import Any

from inference.engine.config import EngineConfig
from inference.engine.outputs import Events, RequestOutputs
from inference.engine.preprocess import Preprocessor
from inference.engine.prompt import PreparedPrompt, PromptError
from inference.engine.scheduler import FairQueue
from inference.engine.sequence import Sequence
from inference.protocol import ErrorCode

logger = logging.getLogger(__name__)


class AdmissionQueue:
    """The requests not yet admitted into the batch, and their preparation. Engine thread
    only."""

    def __init__(self, runner: Any, config: EngineConfig, outputs: RequestOutputs) -> None:
        self._runner = runner
        self._config = config
        self._outputs = outputs
        self._queue: FairQueue[Sequence] = FairQueue()
        self._preparing: deque[Sequence] = deque()  # popped from the queue, in order
        threads = config.preprocess_threads
        if threads is None:
            threads = 2 if runner.device.type == "cuda" else 0
        self._preprocessor = Preprocessor(runner.process_images, threads)

    @property
    def waiting(self) -> int:
        return len(self._queue) + len(self._preparing)

    def push(self, seq: Sequence) -> None:
        self._queue.push(seq.request.tenant_id, seq, seq.request.priority)

    def remove(self, request_ids: Iterable[str]) -> list[Sequence]:
        """Take the waiting requests with these ids out (cancelled); their work is dropped."""
        ids = set(request_ids)
        removed = [seq for seq in self._preparing if seq.request_id in ids]
        for seq in removed:
            self._preparing.remove(seq)
            if seq.processing is not None:
                seq.processing.cancel()
                seq.processing = None
        return removed + self._queue.remove(lambda seq: seq.request_id in ids)

    def take(
        self, room: int, *, busy: bool, events: Events
    ) -> list[tuple[Sequence, PreparedPrompt]]:
        """Up to ``room`` requests with their prompts, ready for a slot and a prefill.

        ``busy``: streams are running, so do not wait for unfinished preprocessing.
        """
        inline = self._preprocessor.inline
        ahead = self._config.preprocess_ahead
        admitted: list[tuple[Sequence, PreparedPrompt]] = []
        while len(admitted) < room:
            self._fill(room - len(admitted) if inline else max(ahead, room))
            if not self._preparing:
                break
            seq = self._preparing[0]
            assert seq.processing is not None
            if not seq.processing.done():
                if busy:
                    break  # streams are waiting on this step: pick it up next time
                wait([seq.processing])  # idle: nothing to stall, and the batch grows
            self._preparing.popleft()
            prompt = self._build_prompt(seq, events)
            if prompt is not None:
                admitted.append((seq, prompt))
        if not inline:
            self._fill(ahead)
        return admitted

    def close(self) -> None:
        self._preprocessor.close()

    def _fill(self, depth: int) -> None:
        while len(self._preparing) < depth:
            seq = self._queue.pop()
            if seq is None:
                return
            seq.processing = self._preprocessor.submit(seq.request, seq.images or {})
            self._preparing.append(seq)

    def _build_prompt(self, seq: Sequence, events: Events) -> PreparedPrompt | None:
        request = seq.request
        processing, seq.processing, seq.images = seq.processing, None, None
        if request.deadline is not None and time.time() > request.deadline:
            self._outputs.fail(seq, ErrorCode.TIMEOUT, "deadline passed before start", events)
            return None
        try:
            assert processing is not None
            prompt: PreparedPrompt = self._runner.build_prompt(
                request.messages, processing.result(), thinking=request.sampling.thinking
            )
        except PromptError as exc:
            self._outputs.fail(seq, exc.code, exc.message, events)
            return None
        except Exception:
            logger.exception("building prompt of %s failed", seq.request_id)
            message = "prompt processing failed"
            self._outputs.fail(seq, ErrorCode.INTERNAL_ERROR, message, events)
            return None
        max_len = self._config.max_seq_len
        need = prompt.length + request.sampling.max_tokens
        if need > max_len:
            message = (
                f"prompt is {prompt.length} tokens ({prompt.image_tokens} for images) and "
                f"max_tokens is {request.sampling.max_tokens}: {need} tokens; this worker holds "
                f"at most {max_len} tokens per request (lower max_tokens or send a shorter "
                "prompt or a smaller image)"
            )
            self._outputs.fail(seq, ErrorCode.CONTEXT_LENGTH_EXCEEDED, message, events)
            return None
        return prompt
