"""The worker's configuration, its engine protocol, and the pure helpers of its loop.

Split out of ``inference.worker`` (which re-exports every name here); see that module for
the loop itself.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from inference.protocol import (
    TERMINAL_EVENTS,
    DeltaEvent,
    ErrorCode,
    ErrorEvent,
    Event,
    InferenceRequest,
    StartEvent,
)
from inference.transports.base import Delivery


class EngineLike(Protocol):
    """The part of ``inference.engine.Engine`` the worker uses (see that module)."""

    def add_request(self, request: InferenceRequest, images: Mapping[str, bytes]) -> None: ...
    def abort(self, request_id: str) -> None: ...
    def step(self) -> list[tuple[str, Event]]: ...
    def has_unfinished(self) -> bool: ...
    def stats(self) -> Any: ...


def default_worker_id() -> str:
    """Unique per process start, so a restarted worker never inherits a dead one's name."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class WorkerConfig:
    model: str
    worker_id: str = field(default_factory=default_worker_id)
    max_batch_size: int | None = None  # None: the engine's own limit
    heartbeat_s: float = 2.0
    claim_interval_s: float = 2.0
    idle_block_ms: int = 200
    max_deliveries: int = 3
    drain_timeout_s: float = 30.0
    # Requests queued longer than this are answered TIMEOUT, not run: their client has
    # given up (INFERENCE_REQUEST_TIMEOUT_SECONDS), so the work would be for nobody.
    max_request_age_s: float | None = None
    # Consecutive failed engine steps after which the engine is not trusted any more.
    max_step_failures: int = 5


@dataclass
class _InFlight:
    delivery: Delivery
    skip_start: bool = False  # a reclaimed request whose StartEvent is already out
    sent_text: bool = False
    buffered: list[Event] = field(default_factory=list)  # stream=False: held until the end


def _error_code_for(exc: BaseException) -> ErrorCode:
    # torch.cuda.OutOfMemoryError is matched by name: the worker does not import torch.
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return ErrorCode.OUT_OF_MEMORY
    if isinstance(exc, ValueError):
        return ErrorCode.INVALID_REQUEST
    return ErrorCode.INTERNAL_ERROR


# What a client is told when the failure is ours: exception text (device names, shapes,
# file paths, other requests' ids) stays in the worker's log.
_OUR_FAILURE_MESSAGES = {
    ErrorCode.OUT_OF_MEMORY: "The model ran out of memory; retry, or send a smaller request.",
    ErrorCode.INTERNAL_ERROR: "The model failed while serving this request.",
}


def _client_message(code: ErrorCode, exc: BaseException) -> str:
    """The message of an ``ErrorEvent`` for ``exc``: the exception's own text only for a
    request the client got wrong (``INVALID_REQUEST``), a fixed sentence otherwise."""
    if code is ErrorCode.INVALID_REQUEST:
        return str(exc)
    return _OUR_FAILURE_MESSAGES.get(code, _OUR_FAILURE_MESSAGES[ErrorCode.INTERNAL_ERROR])


def _coalesce(events: list[Event]) -> list[Event]:
    """A non-streamed reply: its start, all text as one delta, and its terminal event.

    A failed non-streamed request is all-or-nothing: only its error is sent.
    """
    if events and isinstance(events[-1], ErrorEvent):
        return [events[-1]]
    deltas = [e for e in events if isinstance(e, DeltaEvent)]
    out: list[Event] = [e for e in events if isinstance(e, StartEvent)][:1]
    if deltas:
        out.append(
            DeltaEvent(
                text="".join(d.text for d in deltas),
                reasoning="".join(d.reasoning for d in deltas),
                tokens=sum(d.tokens for d in deltas),
            )
        )
    out.extend(e for e in events if isinstance(e, TERMINAL_EVENTS))
    return out
