"""Per-request state inside the engine, from queueing to its terminal event."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from inference.engine.detokenizer import OutputStream
from inference.engine.sampling import RowSampler
from inference.protocol import InferenceRequest, Usage


@dataclass(eq=False)
class Sequence:
    """One request. Invariants while running:

    - ``slot`` is owned by this request alone; positions ``< cached_len`` of the slot hold
      this request's prompt and completion keys/values;
    - ``next_token`` was sampled (and already streamed) but is not in the cache yet: the next
      decode feeds it at position ``cached_len``;
    - ``prompt_tokens + generated <= max_seq_len``.
    """

    request: InferenceRequest
    images: Mapping[str, bytes] | None  # dropped once the prompt is built
    sampler: RowSampler
    prompt_tokens: int = 0
    image_tokens: int = 0
    slot: int = -1
    cached_len: int = 0
    rope_delta: int = 0
    next_token: int = -1
    generated: int = 0
    undelivered_tokens: int = 0  # generated since the last DeltaEvent
    streamed: bool = False  # any text went out (a later error is then not retryable)
    output: OutputStream | None = field(default=None)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.generated,
            image_tokens=self.image_tokens,
            reasoning_tokens=self.output.reasoning_tokens if self.output is not None else 0,
        )
