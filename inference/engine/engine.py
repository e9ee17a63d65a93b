"""The serving engine: continuous batching over a ``ModelRunner``. Pure logic, no IO.

A request goes queue -> preparing -> vision -> prefilling -> running. One ``step()``:

1. takes in requests and aborts that arrived since the last step (``add_request`` and
   ``abort`` only queue work under a lock, so another thread may call them), and ends
   cancelled requests (frees their slots; ``DoneEvent(CANCELLED)``);
2. launches one decode step for every running request (``BucketedDecoder``: padded to a
   batch bucket, static buffers, a CUDA graph per shape on GPU, sampling on the device)
   *without waiting for it*: a running request's next input token is the one the previous
   step left on the device;
3. collects the tokens of the previous decode step and turns them into events (text,
   stop strings, finishes), on the host, while the device runs the step just launched.
   A request that finished there was already in that launch: its extra token is dropped;
4. admits waiting requests, fair across tenants (``FairQueue``), while a slot is free,
   running + prefilling requests are below the batch limit and the prefill work already
   admitted does not exceed one step's budget. Their images were decoded a few places
   ahead, in a thread pool on CUDA (inline on CPU; ``AdmissionQueue``, ``Preprocessor``); the
   prompt is tokenized and checked against the KV capacity (prompt + ``max_tokens`` must
   fit a slot, else ``context_length_exceeded`` at once); their images not in the
   image-embedding cache go into one packed vision pass;
5. spends the step's prefill budget (``prefill_budget_tokens`` while streams decode, else
   ``idle_prefill_budget_tokens``) oldest request first: vision blocks of the passes under
   way, then chunks of the prompts whose images are encoded, packed into one forward and
   written straight into their slots. A large image or prompt takes several steps, each
   still running the decode batch. A request whose prompt is complete samples and streams
   its first token and joins the decode batch.

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
from dataclasses import dataclass
from typing import Any

import torch

from inference.engine.admission import AdmissionQueue
from inference.engine.config import (
    EngineConfig,
    EngineStats,
    GlmEngineStats,
    default_compile_cache_dir,
)
from inference.engine.decoder import BucketedDecoder, DecodeRows, Launch, batch_buckets, kv_buckets
from inference.engine.image_cache import ImageEmbeddingCache
from inference.engine.memory import plan_num_slots
from inference.engine.outputs import Events, RequestOutputs
from inference.engine.prompt import PreparedPrompt
from inference.engine.runner import EncodedImages, ModelRunner, VisionJob
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


@dataclass
class _VisionWork:
    """A packed vision pass and the admitted requests waiting on it (in admission order).

    ``members`` lines up with the pass's prompts and never changes; a member cancelled
    meanwhile is ``finished`` and gets no embeddings (``live``)."""

    job: VisionJob
    members: list[tuple[Sequence, PreparedPrompt]]

    @property
    def live(self) -> list[tuple[Sequence, PreparedPrompt]]:
        return [(seq, prompt) for seq, prompt in self.members if not seq.finished]


class Engine:
    """Continuous-batching engine. ``step()`` must be called from one thread at a time."""

    def __init__(self, runner: ModelRunner, config: EngineConfig) -> None:
        self.runner = runner
        self.config = config
        cuda = runner.device.type == "cuda"
        max_batch = config.max_batch_size or (128 if cuda else 8)
        self.image_cache = ImageEmbeddingCache(config.image_cache_bytes)
        self._slots_total = plan_num_slots(
            requested=config.num_slots,
            max_batch_size=max_batch,
            bytes_per_slot=runner.bytes_per_slot(config.max_seq_len),
            free_bytes=runner.free_memory_bytes(),
            memory_fraction=config.gpu_memory_fraction,
            reserved_bytes=self.image_cache.max_bytes,
        )
        self._batch_limit = min(max_batch, self._slots_total)
        self.cache = runner.allocate_cache(num_slots=self._slots_total, max_len=config.max_seq_len)
        self.slots = SlotPool(self._slots_total)
        compile_decode = config.compile_decode if config.compile_decode is not None else cuda
        if config.compile_prefill if config.compile_prefill is not None else cuda:
            runner.compile_prefill(mode=config.compile_mode, backend=config.compile_backend)
        self.decoder = BucketedDecoder(
            runner,
            self.cache,
            batch_sizes=batch_buckets(self._batch_limit, config.decode_batch_sizes),
            kv_lengths=kv_buckets(
                config.max_seq_len,
                config.decode_kv_lengths,
                # Each shape is a CUDA graph to capture on GPU; on CPU shapes cost nothing.
                smallest=512 if cuda else 64,
            ),
            attention=config.decode_attention,
            cuda_graphs=config.cuda_graphs,
            compile_layers=compile_decode,
            eager_batch_sizes=config.eager_batch_sizes,
            compile_mode=config.compile_mode,
            compile_backend=config.compile_backend,
            compile_cache_dir=config.compile_cache_dir or default_compile_cache_dir(),
            capture_sampling=config.capture_sampling,
        )
        self._outputs = RequestOutputs(
            runner,
            max_seq_len=config.max_seq_len,
            release=self._release,
            token_observer=config.token_observer,
        )
        self._admission = AdmissionQueue(runner, config, self._outputs)
        self._flops_per_token = runner.text_weights.flops_per_token()
        self._vision: deque[_VisionWork] = deque()  # own a slot, images being encoded
        self._prefilling: deque[Sequence] = deque()  # own a slot, prompt partly written
        self._running: dict[str, Sequence] = {}
        self._launched: deque[tuple[Launch, list[Sequence]]] = deque()  # not collected yet
        self._launch_count = 0
        self._last_rows = (0, 0)  # (rows, batch bucket) of the last decode launch
        self._lock = threading.Lock()  # guards the three below
        self._inbox: list[Sequence] = []
        self._aborts: set[str] = set()
        self._known: set[str] = set()  # ids not finished yet, for duplicate detection
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) per step
        self._step_times: deque[float] = deque(maxlen=config.step_window)
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

    @property
    def batch_limit(self) -> int:
        return self._batch_limit

    def stats(self) -> GlmEngineStats:
        with self._lock:
            inbox = len(self._inbox)
        # Snapshots: a heartbeat thread may call this while the engine thread steps.
        running = list(self._running.values())
        prefilling = list(self._prefilling) + [s for w in list(self._vision) for s, _ in w.live]
        steps = sorted(self._step_times)
        rows, bucket = self._last_rows
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
            decoding=rows,
            batch_bucket=bucket,
            image_cache_hits=self.image_cache.hits,
            image_cache_misses=self.image_cache.misses,
            warmup_seconds=self.warmup_seconds,
            decode_batch_sizes=self.decoder.batch_sizes,
            cuda_graphs=self.decoder.use_graphs,
            compiled_batch_sizes=self.decoder.compiled_batch_sizes,
            compile_error=self.decoder.compile_error,
            step_ms_p50=_percentile(steps, 0.5) * 1e3 if steps else None,
            step_ms_p99=_percentile(steps, 0.99) * 1e3 if steps else None,
        )

    def warmup(self) -> float:
        """Run one dummy prefill and every decode shape once (on CUDA: compile the decode
        layer and capture every shape's graph), before serving; returns (and ``stats()``
        reports) the seconds it took.

        Call before the first ``add_request``: it writes into free slots."""
        if self.has_unfinished() or self._running or self._prefilling or self._vision:
            raise RuntimeError("warmup() must run before the engine takes requests")
        started = time.perf_counter()
        warm_prefill(self.runner, self.cache, slot=0)
        self.decoder.warmup()
        if self.runner.device.type == "cuda":
            torch.cuda.synchronize(self.runner.device)
        self.warmup_seconds = time.perf_counter() - started
        logger.info(
            "warm-up %.2fs: %d decode shapes (graphs: %s, compiled buckets: %s)",
            self.warmup_seconds,
            len(self.decoder.shapes),
            self.decoder.use_graphs,
            self.decoder.compiled_batch_sizes,
        )
        return self.warmup_seconds

    def close(self) -> None:
        """Stop the preprocessing threads (the engine is not used afterwards)."""
        self._admission.close()

    def step(self) -> Events:
        started = time.perf_counter()
        events: Events = []
        with self._lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, set()
        for sequence in inbox:
            self._admission.push(sequence)
        self._cancel(aborts, events)
        self._outputs.step_tokens = 0
        decoding = self._launch_decode(events)
        self._collect_decode(events, keep=1 if decoding else 0)
        self._admit(events)
        self._prefill(events, busy=decoding)
        if decoding:
            self._step_times.append(time.perf_counter() - started)
        self._recent.append((time.monotonic(), self._outputs.step_tokens))
        self._trim_recent()
        return events

    # ------------------------------------------------------------------ admission
    def _cancel(self, request_ids: set[str], events: Events) -> None:
        if not request_ids:
            return
        cancelled = [self._running[rid] for rid in request_ids & self._running.keys()]
        cancelled += [s for s in self._prefilling if s.request_id in request_ids]
        cancelled += [s for w in self._vision for s, _ in w.live if s.request_id in request_ids]
        cancelled += self._admission.remove(request_ids)
        for seq in cancelled:
            self._outputs.finish(seq, FinishReason.CANCELLED, events, flush=False)

    def _in_flight(self) -> int:
        return len(self._running) + len(self._prefilling) + sum(len(w.live) for w in self._vision)

    def _pending_prefill_tokens(self) -> float:
        """Prefill work admitted and not done yet, in prompt-token equivalents."""
        tokens = float(sum(s.prefill.remaining for s in self._prefilling if s.prefill))
        for work in self._vision:
            tokens += sum(prompt.length for _, prompt in work.live)
            tokens += work.job.block_cost() * work.job.blocks_left / self._flops_per_token
        return tokens

    def _admit(self, events: Events) -> None:
        """Waiting -> vision: requests in queue order while there is room (slots, batch
        limit) and the prefill work admitted stays within one step's budget (at least one
        request is admitted when none is prefilling, however large)."""
        budget = self._budget_tokens(busy=bool(self._running))
        admitted: list[tuple[Sequence, PreparedPrompt]] = []
        pending = self._pending_prefill_tokens()
        while True:
            # slots.free already counts the requests admitted in this loop; _in_flight not.
            room = min(self.slots.free, self._batch_limit - self._in_flight() - len(admitted))
            if room <= 0 or (pending >= budget and (admitted or self._in_flight())):
                break
            busy = bool(self._running or self._prefilling or self._vision or admitted)
            taken = self._admission.take(1, busy=busy, events=events)
            if not taken:
                break
            seq, prompt = taken[0]
            self.slots.acquire(seq)
            seq.prompt_tokens = prompt.length
            seq.image_tokens = prompt.image_tokens
            admitted.append((seq, prompt))
            pending += prompt.length + prompt.image_tokens  # vision work, roughly
        if admitted:
            self._start_vision(admitted, events)

    def _start_vision(
        self, admitted: list[tuple[Sequence, PreparedPrompt]], events: Events
    ) -> None:
        try:
            job = self.runner.start_vision([p for _, p in admitted], self.image_cache)
        except Exception as exc:
            self._vision_failed(admitted, exc, "vision encoding", events)
            return
        self._vision.append(_VisionWork(job, admitted))

    def _vision_failed(
        self,
        members: list[tuple[Sequence, PreparedPrompt]],
        exc: Exception,
        stage: str,
        events: Events,
    ) -> None:
        """A shared vision pass failed: each request again on its own, so that only the
        request at fault (or too large for memory) fails."""
        if isinstance(exc, torch.OutOfMemoryError):
            self._release_memory()
        if len(members) == 1:
            self._fail_with(members[0][0], exc, stage, events)
            return
        for member in members:
            self._start_vision([member], events)

    # ------------------------------------------------------------------ prefill
    def _budget_tokens(self, *, busy: bool) -> int:
        config = self.config
        return config.prefill_budget_tokens if busy else config.idle_prefill_budget_tokens

    def _prefill(self, events: Events, *, busy: bool) -> None:
        """Spend this step's prefill budget: vision blocks, then packed prompt chunks."""
        budget = self._budget_tokens(busy=busy) * self._flops_per_token
        spent = self._advance_vision(budget, events)
        self._advance_text(budget, spent, events)

    def _advance_vision(self, budget: float, events: Events) -> float:
        spent = 0.0
        while self._vision:
            work = self._vision[0]
            job = work.job
            blocks = 0
            cost = job.block_cost()
            chunked = self.config.chunk_vision
            while blocks < job.blocks_left and (
                not chunked or spent == 0 or spent + cost <= budget
            ):
                blocks += 1
                spent += cost
            try:
                job.run(blocks)
                if not job.done:
                    return spent  # the budget ran out inside this pass
                results = job.results()
            except Exception as exc:
                self._vision.popleft()
                self._vision_failed(work.live, exc, "vision encoding", events)
                continue
            self._vision.popleft()
            for (seq, prompt), images in zip(work.members, results, strict=True):
                if seq.finished:  # cancelled while its pass ran
                    continue
                self._begin_prefill(seq, prompt, images, events)
        return spent

    def _begin_prefill(
        self, seq: Sequence, prompt: PreparedPrompt, images: EncodedImages, events: Events
    ) -> None:
        try:
            job = self.runner.begin_prefill(prompt, images)
        except Exception as exc:
            self._fail_with(seq, exc, "prefill", events)
            return
        seq.prefill = job
        seq.cached_image_tokens = images.cached_tokens
        seq.rope_delta = job.rope_delta
        seq.cached_len = 0
        self._prefilling.append(seq)

    def _advance_text(self, budget: float, spent: float, events: Events) -> None:
        chunks: list[tuple[Sequence, int]] = []
        weights = self.runner.text_weights
        for seq in self._prefilling:
            job = seq.prefill
            assert job is not None
            left = (budget - spent) / self._flops_per_token
            if left < 1 and (spent > 0 or chunks):
                break
            take = min(job.remaining, max(1, int(left)))
            chunks.append((seq, job.done + take))
            spent += take * self._flops_per_token + weights.attention_flops(take, job.done)
        if chunks:
            self._run_prefill(chunks, events)

    def _run_prefill(self, chunks: list[tuple[Sequence, int]], events: Events) -> None:
        jobs = []
        for seq, end in chunks:
            assert seq.prefill is not None
            jobs.append((seq.prefill, seq.slot, end))
        try:
            logits = self.runner.prefill(self.cache, jobs)
        except Exception as exc:
            if isinstance(exc, torch.OutOfMemoryError):
                self._release_memory()
            if len(chunks) == 1:
                self._fail_with(chunks[0][0], exc, "prefill", events)
                return
            for chunk in chunks:  # alone, so that only the request at fault fails
                self._run_prefill([chunk], events)
            return
        completed = []
        for (seq, _end), row_logits in zip(chunks, logits, strict=True):
            assert seq.prefill is not None
            seq.cached_len = seq.prefill.done
            if row_logits is not None:
                completed.append((seq, row_logits))
        if not completed:
            return
        stacked = torch.stack([row for _, row in completed])
        firsts = sample(stacked, [seq.sampler for seq, _ in completed])
        for (seq, _), first in zip(completed, firsts, strict=True):
            job = seq.prefill
            assert job is not None
            self._prefilling.remove(seq)
            self._running[seq.request_id] = seq
            self._outputs.start(seq, job.token_ids, events)
            seq.prefill = None
            self._outputs.on_token(seq, first, events)

    # ------------------------------------------------------------------ decode
    def _wants_decode(self, seq: Sequence) -> bool:
        """Whether another decode step can produce a token ``seq`` will use (steps already
        launched may finish it by length)."""
        produced = seq.generated + seq.pending
        return (
            produced < seq.request.sampling.max_tokens
            and seq.prompt_tokens + produced < self.config.max_seq_len
        )

    def _launch_decode(self, events: Events) -> bool:
        """Launch one decode step for the running requests that want one; False if none."""
        wanted = [s for s in self._running.values() if self._wants_decode(s)]
        if not wanted:
            return False
        rows = self.slots.compact(wanted, self.cache)
        previous = self._launch_count
        sources = [s.launch_row if s.last_launch == previous and s.pending else -1 for s in rows]
        sampling = None
        if any(not s.sampler.greedy for s in rows):
            sampling = [(s.sampler.temperature, s.sampler.top_p, s.sampler.draw()) for s in rows]
        try:
            launch = self.decoder.launch(
                DecodeRows(
                    host_ids=[s.next_token for s in rows],
                    sources=sources,
                    positions=[s.cached_len for s in rows],
                    rope_deltas=[s.rope_delta for s in rows],
                    sampling=sampling,
                )
            )
        except Exception as exc:
            self._decode_failed(rows, exc, events)
            return False
        self._launch_count += 1
        for row, seq in enumerate(rows):
            seq.cached_len += 1
            seq.pending += 1
            seq.last_launch = self._launch_count
            seq.launch_row = row
        self._launched.append((launch, rows))
        self._last_rows = (len(rows), launch.shape[0])
        return True

    def _collect_decode(self, events: Events, *, keep: int) -> None:
        """Collect launched decode steps until ``keep`` remain in flight (oldest first)."""
        while len(self._launched) > keep:
            launch, rows = self._launched.popleft()
            try:
                tokens = self.decoder.collect(launch)
            except Exception as exc:
                self._decode_failed([s for s in rows if not s.finished], exc, events)
                continue
            for seq, token in zip(rows, tokens, strict=True):
                seq.pending -= 1
                if not seq.finished:
                    self._outputs.on_token(seq, token, events)

    def _decode_failed(self, rows: list[Sequence], exc: Exception, events: Events) -> None:
        """End the requests of a decode step that failed. Others keep their state: a step
        launched earlier for them is still valid, and its tokens still come."""
        if not isinstance(exc, torch.OutOfMemoryError):
            logger.exception("decode step failed for %d requests", len(rows))
        for seq in rows:
            if not seq.finished:
                self._fail_with(seq, exc, "decode", events, logged=True)

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
        self._outputs.fail(seq, ErrorCode.INTERNAL_ERROR, f"{stage} failed", events)

    def _release(self, seq: Sequence) -> None:
        """After the terminal event. Freeing the slot at once is safe although a launched
        decode step may still write this request's row into it: every later use of the
        slot (a prefill, a compaction move) is queued on the same device stream after it."""
        seq.finished = True
        self._running.pop(seq.request_id, None)
        if seq in self._prefilling:
            self._prefilling.remove(seq)
        for work in list(self._vision):
            if not work.live:  # nobody waits for this pass any more
                self._vision.remove(work)
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


def _percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


_SPEC_INT_KEYS = (
    "max_batch_size",
    "max_seq_len",
    "num_slots",
    "prefill_budget_tokens",
    "idle_prefill_budget_tokens",
    "preprocess_threads",
    "image_cache_bytes",
)
_SPEC_SIZES_KEYS = ("decode_batch_sizes", "decode_kv_lengths", "eager_batch_sizes")
_SPEC_STR_KEYS = ("decode_attention", "compile_mode", "compile_backend", "compile_cache_dir")


def config_from_spec(spec: Mapping[str, Any]) -> EngineConfig:
    """Engine limits and tuning named in a model spec (``INFERENCE_MODELS``), else defaults.

    Integer keys (``_SPEC_INT_KEYS``; null means the field's None), lists of sizes
    (``_SPEC_SIZES_KEYS``, e.g. ``"eager_batch_sizes": [1]`` where compiling was measured
    not to help), strings (``_SPEC_STR_KEYS``), ``gpu_memory_fraction`` and the booleans
    ``cuda_graphs``, ``compile_decode``, ``compile_prefill``, ``capture_sampling`` and
    ``chunk_vision``.
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
    for key in (
        "cuda_graphs",
        "compile_decode",
        "compile_prefill",
        "capture_sampling",
        "chunk_vision",
    ):
        if key in spec:
            values[key] = None if spec[key] is None else bool(spec[key])
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
