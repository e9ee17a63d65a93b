"""``OcrLiteEngine``: the CPU fallback model behind the same interface as the main engine.

One request starts per ``step()``: its images are read (the only slow part, 0.2 to 1 s per
image on one core), the answer is composed, and it is streamed as a few ``DeltaEvent``s
over the following steps, so requests interleave and ``abort`` takes effect mid-answer.

Token counts are word counts, since there is no tokenizer (see ``answers.count_words``):
``prompt_tokens`` counts the words of every text part of the request (system, user and
assistant turns alike), ``completion_tokens`` the words of the answer streamed;
``image_tokens`` is always 0. ``max_tokens`` caps the answer in words (finish reason
``length``) and stop strings cut it (finish reason ``stop``).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import resource
import threading
import time
import zoneinfo
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# The module, not the package's lazy export (which loads inference.engine.engine, hence
# torch): a CPU fallback worker needs no torch (a second and some hundred MB per process).
from inference.engine.config import EngineStats
from inference.ocr_lite.answers import ImageText, compose_answer, count_words, split_words
from inference.ocr_lite.ocr import ImageDecodeError, OcrReader
from inference.protocol import (
    DeltaEvent,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    Event,
    FinishReason,
    InferenceRequest,
    StartEvent,
    TextPart,
    Usage,
)

logger = logging.getLogger(__name__)

KIND = "ocr-lite"


@dataclass
class _Entry:
    request: InferenceRequest
    images: dict[str, bytes]
    error: ErrorEvent | None = None
    cancelled: bool = False
    started: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    chunks: deque[tuple[str, int]] = field(default_factory=deque)
    finish_reason: FinishReason = FinishReason.STOP


def _question(request: InferenceRequest) -> str:
    """The text of the last user turn: what the answer is about."""
    for message in reversed(request.messages):
        if message.role == "user":
            texts = [part.text for part in message.content if isinstance(part, TextPart)]
            if texts:
                return "\n".join(texts)
    return ""


def _prompt_words(request: InferenceRequest) -> int:
    return sum(
        count_words(part.text)
        for message in request.messages
        for part in message.content
        if isinstance(part, TextPart)
    )


def _cut(answer: str, stop: list[str], max_words: int) -> tuple[list[str], FinishReason]:
    """The answer's words after stop strings and ``max_tokens``, and why it ends."""
    cut_at = min((i for s in stop if s and (i := answer.find(s)) >= 0), default=-1)
    if cut_at >= 0:
        answer = answer[:cut_at]
    words = split_words(answer)
    if len(words) > max_words:
        return words[:max_words], FinishReason.LENGTH
    return words, FinishReason.STOP


def _memory_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        # Peak rather than current, in kilobytes on Linux: better than nothing.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class OcrLiteEngine:
    """Answers questions about images from the text an OCR model reads in them.

    ``today`` gives the date expiry dates are compared with (default: the local date of
    the worker). ``chunks`` is how many deltas an answer streams in; at most
    ``max_batch_size`` answers stream at once (a new request starts only below it). OCR
    results are cached per tenant and image hash (``cache_size`` images), so follow-up
    questions about the same image are instant.
    """

    def __init__(
        self,
        reader: OcrReader | None = None,
        *,
        today: Callable[[], dt.date] = dt.date.today,
        chunks: int = 4,
        max_batch_size: int = 8,
        cache_size: int = 64,
    ) -> None:
        if chunks < 1 or max_batch_size < 1:
            raise ValueError("chunks and max_batch_size must be at least 1")
        self.reader = reader if reader is not None else OcrReader()
        self._today = today
        self._chunks = chunks
        self._max_batch_size = max_batch_size
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], tuple[str, ...]] = OrderedDict()
        self._entries: dict[str, _Entry] = {}
        self._waiting: deque[str] = deque()
        # Guards _entries and _waiting: add_request and abort may come from another thread.
        self._lock = threading.Lock()
        self._busy_seconds = 0.0
        self._words_out = 0

    # -- the Engine interface -------------------------------------------------------------

    def add_request(self, request: InferenceRequest, images: Mapping[str, bytes]) -> None:
        """Queue a request. Problems with it come back as an ``ErrorEvent`` from ``step``."""
        refs = request.image_refs()
        missing = [ref.sha256 for ref in refs if ref.sha256 not in images]
        entry = _Entry(
            request, {ref.sha256: images[ref.sha256] for ref in refs if ref.sha256 in images}
        )
        if missing:
            entry.error = ErrorEvent(
                ErrorCode.IMAGE_UNAVAILABLE,
                f"image {missing[0]} is not available (expired or never stored)",
                retryable=False,
            )
        with self._lock:
            if request.request_id in self._entries:
                raise ValueError(f"duplicate request id {request.request_id!r}")
            self._entries[request.request_id] = entry
            self._waiting.append(request.request_id)

    def abort(self, request_id: str) -> None:
        """Finish the request with ``DoneEvent(CANCELLED)`` at the next step; unknown or
        already finished ids are ignored."""
        with self._lock:
            entry = self._entries.get(request_id)
            if entry is not None:
                entry.cancelled = True

    def step(self) -> list[tuple[str, Event]]:
        """Cancel, report errors, stream one delta of every running answer, then start at
        most one waiting request. Its OCR runs outside the lock, so ``add_request`` and
        ``abort`` from another thread never wait for it."""
        began = time.perf_counter()
        events: list[tuple[str, Event]] = []
        with self._lock:
            for request_id, entry in list(self._entries.items()):
                if entry.cancelled:
                    usage = Usage(entry.prompt_tokens, entry.completion_tokens)
                    self._finish(request_id, DoneEvent(FinishReason.CANCELLED, usage), events)
                elif entry.error is not None:
                    self._finish(request_id, entry.error, events)
                elif entry.started:
                    self._stream_next(request_id, entry, events)
            picked = self._next_waiting()
        if picked is not None:
            outcome = self._answer(*picked)
            with self._lock:
                self._start(*picked, outcome, events)
        self._busy_seconds += time.perf_counter() - began
        return events

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._entries)

    def stats(self) -> EngineStats:
        with self._lock:
            running = self._running()
            total = len(self._entries)
        return EngineStats(
            running=running,
            waiting=total - running,
            max_batch_size=self._max_batch_size,
            kv_used_tokens=0,
            kv_capacity_tokens=0,
            tokens_per_second=self._words_out / self._busy_seconds if self._busy_seconds else 0.0,
            device="cpu",
            memory_bytes=_memory_bytes(),
        )

    # -- internals --------------------------------------------------------------------------

    def _running(self) -> int:
        return sum(1 for entry in self._entries.values() if entry.started)

    def _finish(self, request_id: str, event: Event, events: list[tuple[str, Event]]) -> None:
        events.append((request_id, event))
        del self._entries[request_id]

    def _next_waiting(self) -> tuple[str, _Entry] | None:
        if self._running() >= self._max_batch_size:
            return None
        while self._waiting:
            request_id = self._waiting.popleft()
            entry = self._entries.get(request_id)
            if entry is not None and not entry.cancelled:
                return request_id, entry
        return None

    def _answer(self, request_id: str, entry: _Entry) -> str | ErrorEvent:
        """The full answer text, or the error that ends the request instead."""
        request = entry.request
        if request.deadline is not None and time.time() > request.deadline:
            return ErrorEvent(ErrorCode.TIMEOUT, "the request waited past its deadline")
        try:
            return compose_answer(_question(request), self._read_images(entry), self._today())
        except ImageDecodeError:
            logger.warning("ocr-lite could not decode an image of %s", request_id, exc_info=True)
            return ErrorEvent(ErrorCode.INVALID_REQUEST, "cannot decode image")
        except Exception:
            logger.exception("ocr-lite failed on request %s", request_id)
            return ErrorEvent.fixed(ErrorCode.INTERNAL_ERROR, retryable=True)

    def _start(
        self,
        request_id: str,
        entry: _Entry,
        outcome: str | ErrorEvent,
        events: list[tuple[str, Event]],
    ) -> None:
        if entry.cancelled:  # aborted while its images were being read
            self._finish(request_id, DoneEvent(FinishReason.CANCELLED, Usage()), events)
            return
        if isinstance(outcome, ErrorEvent):
            self._finish(request_id, outcome, events)
            return
        request = entry.request
        words, entry.finish_reason = _cut(
            outcome, request.sampling.stop, request.sampling.max_tokens
        )
        size = max(1, -(-len(words) // self._chunks))  # ceiling division
        for i in range(0, len(words), size):
            piece = words[i : i + size]
            entry.chunks.append(("".join(piece), len(piece)))
        entry.started = True
        entry.prompt_tokens = _prompt_words(request)
        events.append((request_id, StartEvent(prompt_tokens=entry.prompt_tokens)))
        self._stream_next(request_id, entry, events)

    def _stream_next(self, request_id: str, entry: _Entry, events: list[tuple[str, Event]]) -> None:
        if entry.chunks:
            text, words = entry.chunks.popleft()
            entry.completion_tokens += words
            self._words_out += words
            events.append((request_id, DeltaEvent(text=text, tokens=words)))
        if not entry.chunks:
            usage = Usage(entry.prompt_tokens, entry.completion_tokens)
            self._finish(request_id, DoneEvent(entry.finish_reason, usage), events)

    def _read_images(self, entry: _Entry) -> list[ImageText]:
        """OCR every distinct image of the request, in order of first appearance."""
        tenant = entry.request.tenant_id
        texts = []
        for sha256 in dict.fromkeys(ref.sha256 for ref in entry.request.image_refs()):
            key = (tenant, sha256)
            lines = self._cache.get(key)
            if lines is None:
                lines = tuple(line.text for line in self.reader.read(entry.images[sha256]))
                self._cache[key] = lines
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
            texts.append(ImageText(lines))
        return texts


def _today_in(timezone: str) -> Callable[[], dt.date]:
    try:
        zone = zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown timezone {timezone!r}") from exc
    return lambda: dt.datetime.now(zone).date()


def ocr_lite_engine_from_spec(spec: Mapping[str, Any]) -> OcrLiteEngine:
    """Build the engine from an ``INFERENCE_MODELS`` entry such as ``{"kind": "ocr-lite"}``.

    Optional keys: ``threads`` (ONNX Runtime threads, default: all cores), ``min_score``
    (drop OCR boxes read with less confidence, default 0.5), ``timezone`` (IANA name whose
    date counts as today, default the worker's local time), ``preload`` (load the OCR model
    now rather than on the first request, default false). Other keys belong to the worker
    and are ignored.
    """
    kind = spec.get("kind", KIND)
    if kind != KIND:
        raise ValueError(f"spec kind is {kind!r}, not {KIND!r}")
    threads = spec.get("threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool)):
        raise ValueError("threads must be an integer")
    min_score = spec.get("min_score", 0.5)
    if not isinstance(min_score, int | float) or isinstance(min_score, bool):
        raise ValueError("min_score must be a number")
    reader = OcrReader(threads=threads, min_score=float(min_score))

    today: Callable[[], dt.date] = dt.date.today
    timezone = spec.get("timezone")
    if timezone is not None:
        today = _today_in(str(timezone))
    if spec.get("preload", False):
        reader.load()
    return OcrLiteEngine(reader, today=today)
