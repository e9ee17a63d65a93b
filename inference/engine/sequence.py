"""Per-request state inside the engine, from queueing to its terminal event."""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from inference.engine.detokenizer import OutputStream
from inference.engine.sampling import RowSampler
from inference.protocol import InferenceRequest, Usage

if TYPE_CHECKING:
    from inference.engine.prompt import ProcessedImage
    from inference.engine.runner import PrefillJob


@dataclass(eq=False)
class Sequence:
    """One request. Its stages, in order (each at most once):

    1. queued (``FairQueue``), holding ``images`` (bytes);
    2. preparing: ``processing`` resolves to its preprocessed images (thread pool);
    3. prefilling: ``prefill`` is set and ``slot`` owned; ``cached_len`` positions written;
    4. running (decoding); then its terminal event frees the slot.

    Invariants while running:

    - ``slot`` is owned by this request alone; positions ``< cached_len`` of the slot hold
      this request's prompt and completion keys/values, or will once the decode steps
      already launched for it have run (``cached_len`` counts launched writes);
    - ``pending`` decode steps were launched for it whose tokens are not collected yet; when
      ``pending`` is 0, ``next_token`` was sampled (and streamed) but is not in the cache
      yet: the next decode feeds it at position ``cached_len``; otherwise the next decode
      takes its token from the device (the previous launch's row ``launch_row``);
    - ``prompt_tokens + generated + pending <= max_seq_len``.
    """

    request: InferenceRequest
    images: Mapping[str, bytes] | None  # dropped once the images are processed
    sampler: RowSampler
    processing: Future[list[ProcessedImage]] | None = None
    prefill: PrefillJob | None = None
    prompt_tokens: int = 0
    image_tokens: int = 0
    cached_image_tokens: int = 0
    slot: int = -1
    cached_len: int = 0
    rope_delta: int = 0
    next_token: int = -1
    pending: int = 0  # decode steps launched, tokens not collected
    last_launch: int = -1  # the decode launch that last included this request
    launch_row: int = -1  # its row in that launch
    finished: bool = False  # terminal event sent; tokens still in flight are dropped
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
            cached_image_tokens=self.cached_image_tokens,
        )
