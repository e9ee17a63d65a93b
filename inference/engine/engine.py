"""The serving engine: continuous batching over a ``ModelRunner``. Pure logic, no IO.

A request goes queue -> preparing -> prefilling -> running. One ``step()``:

1. takes in requests and aborts that arrived since the last step (``add_request`` and
   ``abort`` only queue work under a lock, so another thread may call them);
2. ends cancelled requests (frees their slots; ``DoneEvent(CANCELLED)``);
3. admits up to ``prefills_per_step`` requests, fair across tenants (``FairQueue``), while a
   slot is free and running + prefilling requests are below the batch limit. Their images
   were decoded and preprocessed a few places ahead, in a thread pool on CUDA (inline on
   CPU; ``Admission``, ``Preprocessor``);
   the prompt is tokenized, checked against the KV capacity (prompt + ``max_tokens`` must
   fit a slot, else ``context_length_exceeded`` at once), and the vision tower runs once
   for all their images not in the image-embedding cache;
4. prefills at most ``prefill_chunk_tokens`` prompt tokens, oldest request first, written
   straight into the requests' slots: a long prompt (a large image) takes several steps,
   each of which still runs the decode batch below. A request whose prompt is complete
   samples and streams its first token and joins the decode batch;
5. runs one decode step for every running request (``BucketedDecoder``: padded to a batch
   bucket, static buffers, a CUDA graph per shape on GPU), samples one token each.

Events come back in order per request: ``StartEvent``, ``DeltaEvent``\\*, then one
``DoneEvent`` or ``ErrorEvent``. A problem with one request (bad image, prompt too long,
an exception or out-of-memory in its vision pass or prefill) ends only that request. An
exception in the shared decode step ends the requests of that batch; the engine keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import torch

from inference.engine.admission import Admission
from inference.engine.attention import GROUPED_ATTENTION
from inference.engine.config import EngineConfig, EngineStats, GlmEngineStats
from inference.engine.decoder import BucketedDecoder, batch_buckets, kv_buckets
from inference.engine.image_cache import ImageEmbeddingCache
from inference.engine.memory import plan_num_slots
from inference.engine.outputs import Events, RequestOutputs
from inference.engine.prompt import PreparedPrompt
from inference.engine.runner import EncodedImages, ModelRunner
from inference.engine.sampling import RowSampler, sample
from inference.engine.sequence import Sequence
from inference.engine.slots import SlotPool
from inference.engine.warmup import warm_prefill
from inference.protocol import ErrorCode, FinishReason, InferenceRequest

logger = logging.getLogger(__name__)

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineStats",
    "GlmEngineStats",
    "config_from_spec",
    "engine_from_spec",
]


class Engine:
    """Continuous-batching engine. ``step()`` must be called from one thread at a time."""

    def __init__(self, runner: ModelRunner, config: EngineConfig) -> None:
        self.runner = runner
        self.config = config
        self.image_cache = ImageEmbeddingCache(config.image_cache_bytes)
        self._slots_total = plan_num_slots(
            requested=config.num_slots,
            max_batch_size=config.max_batch_size,
            bytes_per_slot=runner.bytes_per_slot(config.max_seq_len),
            free_bytes=runner.free_memory_bytes(),
            memory_fraction=config.gpu_memory_fraction,
            reserved_bytes=self.image_cache.max_bytes,
        )
        self._batch_limit = min(config.max_batch_size, self._slots_total)
        self.cache = runner.allocate_cache(num_slots=self._slots_total, max_len=config.max_seq_len)
        self.slots = SlotPool(self._slots_total)
        self.decoder = BucketedDecoder(
            runner,
            self.cache,
            batch_sizes=batch_buckets(self._batch_limit, config.decode_batch_sizes),
            kv_lengths=kv_buckets(
                config.max_seq_len,
                config.decode_kv_lengths,
                # Each shape is a CUDA graph to capture on GPU; on CPU shapes cost nothing.
                smallest=512 if runner.device.type == "cuda" else 64,
            ),
            attention=GROUPED_ATTENTION if config.decode_attention == "grouped" else None,
            cuda_graphs=config.cuda_graphs,
            compile_batch_sizes=config.compile_batch_sizes,
            compile_mode=config.compile_mode,
            compile_backend=config.compile_backend,
            compile_cache_dir=config.compile_cache_dir,
        )
        self._outputs = RequestOutputs(
            runner,
            max_seq_len=config.max_seq_len,
            release=self._release,
            token_observer=config.token_observer,
        )
        self._admission = Admission(runner, config, self._outputs)
        self._prefilling: deque[Sequence] = deque()  # own a slot, prompt partly written
        self._running: dict[str, Sequence] = {}
        self._lock = threading.Lock()  # guards the three below
        self._inbox: list[Sequence] = []
        self._aborts: set[str] = set()
        self._known: set[str] = set()  # ids not finished yet, for duplicate detection
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) per step
        self.warmup_seconds: float | None = None

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

    def stats(self) -> GlmEngineStats:
        with self._lock:
            inbox = len(self._inbox)
        # Snapshots: a heartbeat thread may call this while the engine thread steps.
        running = list(self._running.values())
        prefilling = list(self._prefilling)
        return GlmEngineStats(
            running=len(running) + len(prefilling),
            waiting=self._admission.waiting + inbox,
            max_batch_size=self._batch_limit,
            kv_used_tokens=sum(s.cached_len for s in running + prefilling),
            kv_capacity_tokens=self._slots_total * self.config.max_seq_len,
            tokens_per_second=self._tokens_per_second(),
            device=self.runner.device_name,
            memory_bytes=self.runner.memory_bytes(self.cache),
            prefilling=len(prefilling),
            image_cache_hits=self.image_cache.hits,
            image_cache_misses=self.image_cache.misses,
            warmup_seconds=self.warmup_seconds,
            decode_batch_sizes=self.decoder.batch_sizes,
            cuda_graphs=self.decoder.use_graphs,
        )

    def warmup(self) -> float:
        """Run one dummy prefill and every decode shape once (on CUDA: capture their graphs),
        before serving; returns (and ``stats()`` reports) the seconds it took.

        Call before the first ``add_request``: it writes into free slots."""
        if self.has_unfinished() or self._running or self._prefilling:
            raise RuntimeError("warmup() must run before the engine takes requests")
        started = time.perf_counter()
        warm_prefill(self.runner, self.cache, slot=0)
        self.decoder.warmup()
        if self.runner.device.type == "cuda":
            torch.cuda.synchronize(self.runner.device)
        self.warmup_seconds = time.perf_counter() - started
        logger.info(
            "warm-up %.2fs: %d decode shapes (graphs: %s)",
            self.warmup_seconds,
            len(self.decoder.shapes),
            self.decoder.use_graphs,
        )
        return self.warmup_seconds

    def close(self) -> None:
        """Stop the preprocessing threads (the engine is not used afterwards)."""
        self._admission.close()

    def step(self) -> Events:
        events: Events = []
        with self._lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, set()
        for sequence in inbox:
            self._admission.push(sequence)
        self._cancel(aborts, events)
        self._outputs.step_tokens = 0
        self._admit(events)
        self._prefill(events)
        if self._running:
            self._decode(events)
        self._recent.append((time.monotonic(), self._outputs.step_tokens))
        self._trim_recent()
        return events

    # ------------------------------------------------------------------ admission
    def _cancel(self, request_ids: set[str], events: Events) -> None:
        if not request_ids:
            return
        cancelled = [self._running[rid] for rid in request_ids & self._running.keys()]
        cancelled += [s for s in self._prefilling if s.request_id in request_ids]
        cancelled += self._admission.remove(request_ids)
        for seq in cancelled:
            self._outputs.finish(seq, FinishReason.CANCELLED, events, flush=False)

    def _room(self) -> int:
        in_flight = len(self._running) + len(self._prefilling)
        return min(self.config.prefills_per_step, self.slots.free, self._batch_limit - in_flight)

    def _admit(self, events: Events) -> None:
        """Waiting -> prefilling: up to ``_room()`` prompts this step, in queue order."""
        busy = bool(self._running or self._prefilling)
        admitted = self._admission.take(self._room(), busy=busy, events=events)
        for seq, _ in admitted:
            self.slots.acquire(seq)
        if admitted:
            self._start_prefills(admitted, events)

    def _start_prefills(
        self, admitted: list[tuple[Sequence, PreparedPrompt]], events: Events
    ) -> None:
        for seq, prompt, images in self._encode(admitted, events):
            try:
                job = self.runner.begin_prefill(prompt, images)
            except Exception as exc:
                self._fail_with(seq, exc, "prefill", events)
                continue
            seq.prefill = job
            seq.prompt_tokens = prompt.length
            seq.image_tokens = prompt.image_tokens
            seq.cached_image_tokens = images.cached_tokens
            seq.rope_delta = job.rope_delta
            seq.cached_len = 0
            self._prefilling.append(seq)

    def _encode(
        self, admitted: list[tuple[Sequence, PreparedPrompt]], events: Events
    ) -> list[tuple[Sequence, PreparedPrompt, EncodedImages]]:
        """One vision pass for all ``admitted``; on failure, one request at a time, so that
        only the request at fault (or too large for memory) fails."""
        try:
            encoded = self.runner.encode_images([p for _, p in admitted], self.image_cache)
        except Exception as exc:
            if isinstance(exc, torch.OutOfMemoryError):
                self._release_memory()
            if len(admitted) > 1:
                return [out for item in admitted for out in self._encode([item], events)]
            self._fail_with(admitted[0][0], exc, "vision encoding", events)
            return []
        return [(s, p, e) for (s, p), e in zip(admitted, encoded, strict=True)]

    # ------------------------------------------------------------------ model steps
    def _prefill(self, events: Events) -> None:
        budget = self.config.prefill_chunk_tokens
        for seq in list(self._prefilling):
            if budget is not None and budget <= 0:
                return
            job = seq.prefill
            assert job is not None
            start = job.done
            end = job.length if budget is None else min(job.length, start + budget)
            try:
                logits = self.runner.prefill_chunk(self.cache, job, seq.slot, end)
            except Exception as exc:
                self._fail_with(seq, exc, "prefill", events)
                continue
            seq.cached_len = job.done
            if budget is not None:
                budget -= end - start
            if logits is not None:
                self._prefilling.remove(seq)
                self._running[seq.request_id] = seq
                self._outputs.start(seq, job.token_ids, events)
                seq.prefill = None
                first = sample(logits.view(1, -1), [seq.sampler])[0]
                self._outputs.on_token(seq, first, events)

    def _decode(self, events: Events) -> None:
        rows = self.slots.compact(self._running.values(), self.cache)
        try:
            logits = self.decoder.decode(
                [s.next_token for s in rows],
                [s.cached_len for s in rows],
                [s.rope_delta for s in rows],
            )
            tokens = sample(logits, [s.sampler for s in rows])
        except Exception as exc:
            if not isinstance(exc, torch.OutOfMemoryError):
                logger.exception("decode step failed for %d requests", len(rows))
            for seq in rows:
                self._fail_with(seq, exc, "decode", events, logged=True)
            return
        for seq, token in zip(rows, tokens, strict=True):
            seq.cached_len += 1
            self._outputs.on_token(seq, token, events)

    # ------------------------------------------------------------------ endings
    def _fail_with(
        self, seq: Sequence, exc: Exception, stage: str, events: Events, *, logged: bool = False
    ) -> None:
        if isinstance(exc, torch.OutOfMemoryError):
            self._release_memory()
            message = f"out of memory during {stage}"
            self._outputs.fail(seq, ErrorCode.OUT_OF_MEMORY, message, events)
            return
        if not logged:
            logger.exception("%s of %s failed", stage, seq.request_id)
        self._outputs.fail(seq, ErrorCode.INTERNAL_ERROR, f"{stage} failed: {exc}", events)

    def _release(self, seq: Sequence) -> None:
        self._running.pop(seq.request_id, None)
        if seq in self._prefilling:
            self._prefilling.remove(seq)
        self.slots.release(seq)
        seq.prefill = None
        seq.images = None
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


_SPEC_INT_KEYS = (
    "max_batch_size",
    "max_seq_len",
    "num_slots",
    "prefills_per_step",
    "prefill_chunk_tokens",
    "preprocess_threads",
    "image_cache_bytes",
)
_SPEC_SIZES_KEYS = ("decode_batch_sizes", "decode_kv_lengths", "compile_batch_sizes")
_SPEC_STR_KEYS = ("decode_attention", "compile_mode", "compile_backend", "compile_cache_dir")


def config_from_spec(spec: Mapping[str, Any]) -> EngineConfig:
    """Engine limits and tuning named in a model spec (``INFERENCE_MODELS``), else defaults.

    Integer keys (``_SPEC_INT_KEYS``; null means the field's None), lists of sizes
    (``_SPEC_SIZES_KEYS``, e.g. ``"compile_batch_sizes": [1, 8]`` once measured to help),
    strings (``_SPEC_STR_KEYS``), ``gpu_memory_fraction`` and ``cuda_graphs``.
    """
    values: dict[str, Any] = {
        k: None if spec[k] is None else int(spec[k]) for k in _SPEC_INT_KEYS if k in spec
    }
    for key in _SPEC_SIZES_KEYS:
        if spec.get(key) is not None:
            values[key] = tuple(int(size) for size in spec[key])
    for key in _SPEC_STR_KEYS:
        if key in spec:
            values[key] = None if spec[key] is None else str(spec[key])
    if "gpu_memory_fraction" in spec:
        values["gpu_memory_fraction"] = float(spec["gpu_memory_fraction"])
    if "cuda_graphs" in spec:
        values["cuda_graphs"] = bool(spec["cuda_graphs"])
    return EngineConfig(**values)


def engine_from_spec(spec: Mapping[str, Any], config: EngineConfig | None = None) -> Engine:
    """Load the model named by ``spec`` (see ``ModelSpec``), build an engine and warm it up.

    Without ``config`` the engine's settings come from the spec itself (``config_from_spec``).
    ``"warmup": false`` in the spec skips the warm-up (its duration is in
    ``stats().warmup_seconds``).
    """
    engine = Engine(ModelRunner.from_spec(spec), config or config_from_spec(spec))
    if spec.get("warmup", True):
        engine.warmup()
    return engine
