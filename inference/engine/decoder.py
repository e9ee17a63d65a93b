"""Fixed-shape decode steps: batch and KV-length buckets, static buffers, CUDA graphs,
compiled layers, sampling on the device, and steps launched ahead of their results.

One decode step runs every decoding request (row ``i`` in KV slot ``i``) through the text
model, ``lm_head`` and the sampler. The shapes are fixed so that each can be captured once
and replayed:

- the batch is padded to the smallest *batch bucket* that holds it (default 1, 2, 4, 8, ...
  up to the engine's batch limit); padded rows feed token 0 at position 0 and write their
  key/value into the cache's scratch slot, so they never touch a request's slot; their
  tokens are dropped;
- attention reads the first ``kv_len`` positions of each slot, ``kv_len`` the smallest
  *KV bucket* above the longest row (default 512, 1024, ... up to ``max_len``);
- every per-step input lives in static tensors updated in place (``StaticDecodeInputs``);
  the mask is computed inside the step from the write positions.

The step of a shape is a closure over those buffers only: no arguments, no Python-side
per-step state, no host synchronisation. On CUDA (``cuda_graphs=True``) each shape is
captured by ``warmup()`` into a ``torch.cuda.CUDAGraph`` (all sharing one memory pool) and
replayed; on CPU the same closure runs eagerly on the same buffers, so CPU tests exercise
the code a GPU captures.

Each layer is ``text_forward.make_decode_layer``; with ``compile_layers`` it goes through
``torch.compile`` once (batch and KV length dynamic) and every layer of every shape reuses
the compiled code. Buckets in ``eager_batch_sizes`` (measured not to gain) keep it eager.

Sampling happens inside the step (``sampling.choose_tokens``): the ids go to a device buffer
``next_ids`` and, in one small copy, to pinned host memory. The next step reads a running
row's token from ``next_ids`` on the device (``SRC``), so the engine can launch step N+1
before it has looked at step N's tokens (``launch``/``collect``): the host detokenises and
streams step N while the device computes step N+1. Two staging buffers alternate between
consecutive launches; at most two launches are uncollected at any time.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from inference.engine.kv_cache import SlotKVCache
from inference.engine.sampling import choose_tokens
from inference.engine.text_forward import TextWeights

logger = logging.getLogger(__name__)

StepFn = Callable[[], torch.Tensor]
Shape = tuple[int, int, bool]  # (batch bucket, kv bucket, sampling)


def batch_buckets(limit: int, requested: Sequence[int] | None = None) -> tuple[int, ...]:
    """Sorted batch sizes ``<= limit`` whose largest is ``limit`` (so every batch fits)."""
    if requested:
        sizes = {int(b) for b in requested if 1 <= int(b) <= limit}
    else:
        sizes = {1 << k for k in range(limit.bit_length()) if 1 << k <= limit}
    sizes.add(limit)
    return tuple(sorted(sizes))


def kv_buckets(
    max_len: int, requested: Sequence[int] | None = None, smallest: int = 512
) -> tuple[int, ...]:
    """Sorted attention lengths ``<= max_len`` whose largest is ``max_len``."""
    if requested:
        sizes = {int(k) for k in requested if 1 <= int(k) <= max_len}
    else:
        sizes = set()
        size = smallest
        while size < max_len:
            sizes.add(size)
            size *= 2
    sizes.add(max_len)
    return tuple(sorted(sizes))


def pick_bucket(buckets: Sequence[int], need: int) -> int:
    """The smallest bucket ``>= need``; ValueError when none is."""
    index = bisect.bisect_left(buckets, need)
    if index == len(buckets):
        raise ValueError(f"{need} exceeds the largest bucket {buckets[-1]}")
    return buckets[index]


class StaticDecodeInputs:
    """The fixed-address tensors every decode shape reads. Rows past the batch are padding.

    ``ints`` rows: ``HOST_IDS`` the token to feed when ``SRC`` is -1, ``SRC`` else the row of
    the previous step whose sampled token (in ``next_ids``) to feed, ``WRITE_POS`` the row's
    cached length (where its new key/value goes), ``ROPE_POS`` its M-RoPE position (write
    position + rope delta, all three axes), ``WRITE_SLOT`` (``i`` or scratch).
    ``floats`` rows: temperature (0: greedy), top-p, the row's uniform draw.
    """

    HOST_IDS, SRC, WRITE_POS, ROPE_POS, WRITE_SLOT = range(5)
    TEMPERATURE, TOP_P, UNIFORM = range(3)

    def __init__(self, max_batch: int, max_len: int, scratch: int, device: torch.device) -> None:
        self.max_batch = max_batch
        self.scratch = scratch
        self.device = device
        self.ints = torch.zeros(5, max_batch, dtype=torch.long, device=device)
        self.floats = torch.zeros(3, max_batch, dtype=torch.float32, device=device)
        self.next_ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.kv_positions = torch.arange(max_len, dtype=torch.long, device=device)
        pin = device.type == "cuda"
        # Two host staging sets, used by alternate launches (see module doc).
        self._stage_ints = [
            torch.zeros(5, max_batch, dtype=torch.long, pin_memory=pin) for _ in range(2)
        ]
        self._stage_floats = [
            torch.zeros(3, max_batch, dtype=torch.float32, pin_memory=pin) for _ in range(2)
        ]
        self.out = [torch.zeros(max_batch, dtype=torch.long, pin_memory=pin) for _ in range(2)]

    def fill(self, stage: int, rows: DecodeRows) -> None:
        """Stage ``rows`` (``0..n-1``; the rest padding) and copy them to the device buffers
        (asynchronously from pinned memory on CUDA)."""
        n = len(rows.host_ids)
        if n > self.max_batch:
            raise ValueError(f"{n} rows exceed the largest bucket {self.max_batch}")
        ints = self._stage_ints[stage].numpy()
        ints[:] = 0
        ints[self.SRC] = -1
        ints[self.WRITE_SLOT] = self.scratch
        if n:
            ints[self.HOST_IDS, :n] = rows.host_ids
            ints[self.SRC, :n] = rows.sources
            ints[self.WRITE_POS, :n] = rows.positions
            ints[self.ROPE_POS, :n] = np.add(rows.positions, rows.rope_deltas)
            ints[self.WRITE_SLOT, :n] = np.arange(n)
        non_blocking = self.device.type == "cuda"
        self.ints.copy_(self._stage_ints[stage], non_blocking=non_blocking)
        if rows.sampling is not None:
            floats = self._stage_floats[stage].numpy()
            floats[:] = 0
            floats[:, :n] = np.asarray(rows.sampling, dtype=np.float32).T
            self.floats.copy_(self._stage_floats[stage], non_blocking=non_blocking)


@dataclass
class DecodeRows:
    """The inputs of one decode step, row ``i`` in KV slot ``i``.

    ``sources[i]``: the row of the previous launch whose sampled token row ``i`` feeds, or
    -1 to feed ``host_ids[i]``. ``sampling``: ``(temperature, top_p, uniform)`` per row when
    any row samples, else None (the greedy graph).
    """

    host_ids: Sequence[int]
    sources: Sequence[int]
    positions: Sequence[int]
    rope_deltas: Sequence[int]
    sampling: Sequence[tuple[float, float, float]] | None = None

    @classmethod
    def fresh(
        cls, token_ids: Sequence[int], positions: Sequence[int], rope_deltas: Sequence[int]
    ) -> DecodeRows:
        return cls(token_ids, [-1] * len(token_ids), positions, rope_deltas)


@dataclass
class Launch:
    """A decode step in flight: its staging set, its rows and the event after its copy."""

    stage: int
    rows: int
    shape: Shape
    event: Any  # torch.cuda.Event on CUDA, None on CPU (already complete)
    collected: bool = False


class BucketedDecoder:
    """Runs decode steps at bucketed shapes over ``StaticDecodeInputs``. Not thread-safe."""

    def __init__(
        self,
        runner: Any,
        cache: SlotKVCache,
        *,
        batch_sizes: Sequence[int],
        kv_lengths: Sequence[int],
        attention: str = "grouped",
        cuda_graphs: bool = True,
        compile_layers: bool = False,
        eager_batch_sizes: Sequence[int] = (),
        compile_mode: str | None = None,
        compile_backend: str = "inductor",
        compile_cache_dir: str | None = None,
        capture_sampling: bool = True,
    ) -> None:
        self.runner = runner
        self.cache = cache
        self.weights: TextWeights = runner.text_weights
        self.batch_sizes = tuple(batch_sizes)
        self.kv_lengths = tuple(kv_lengths)
        if self.batch_sizes[-1] > cache.num_slots:
            raise ValueError("a batch bucket is larger than the number of KV slots")
        self.attention = attention
        self.device = cache.device
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self.capture_sampling = capture_sampling
        self._eager_layer = runner.decode_layer(attention, compiled=False)
        self._compiled_layer: Callable[..., torch.Tensor] | None = None
        self.eager_batch_sizes = frozenset(eager_batch_sizes)
        self.compile_error: str | None = None
        if compile_layers:
            if compile_cache_dir:
                # Inductor reads its cache location from the environment when it compiles.
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = compile_cache_dir
            _raise_recompile_limit(64)
            self._compiled_layer = runner.decode_layer(
                attention, compiled=True, mode=compile_mode, backend=compile_backend
            )
        self.inputs = StaticDecodeInputs(
            self.batch_sizes[-1], cache.max_len, cache.scratch, self.device
        )
        self._fns: dict[Shape, StepFn] = {}
        self._graphs: dict[Shape, tuple[Any, torch.Tensor]] = {}
        self._pool: Any = None
        self._launches = 0
        self._uncollected: list[Launch | None] = [None, None]
        self.runs: Counter[tuple[int, int]] = Counter()  # steps per (batch, kv_len) shape

    # ------------------------------------------------------------------ shapes
    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [(b, k) for b in self.batch_sizes for k in self.kv_lengths]

    @property
    def compiled_batch_sizes(self) -> tuple[int, ...]:
        if self._compiled_layer is None:
            return ()
        return tuple(b for b in self.batch_sizes if b not in self.eager_batch_sizes)

    def plan(self, rows: int, longest: int) -> tuple[int, int]:
        """(batch bucket, kv bucket) for ``rows`` rows whose largest write position is
        ``longest`` (the new token goes there, so ``kv_len > longest``)."""
        return pick_bucket(self.batch_sizes, rows), pick_bucket(self.kv_lengths, longest + 1)

    # ------------------------------------------------------------------ steps
    def launch(self, rows: DecodeRows) -> Launch:
        """Start one decode step for ``rows``; ``collect`` returns its sampled token ids.

        Returns at once on CUDA (the step is queued behind earlier work); on CPU the step
        has run when it returns."""
        n = len(rows.host_ids)
        batch, kv_len = self.plan(n, max(rows.positions))
        stage = self._launches % 2
        older = self._uncollected[stage]
        if older is not None:  # its staging buffers are about to be rewritten
            self.collect(older)
        self._launches += 1
        self.inputs.fill(stage, rows)
        shape = (batch, kv_len, rows.sampling is not None)
        self._run(shape)
        out = self.inputs.out[stage]
        cuda = self.device.type == "cuda"
        out[:n].copy_(self.inputs.next_ids[:n], non_blocking=cuda)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        launch = Launch(stage=stage, rows=n, shape=shape, event=event)
        self._uncollected[stage] = launch
        return launch

    def collect(self, launch: Launch) -> list[int]:
        """The token ids of ``launch``, row by row (waits for the step to finish)."""
        if launch.event is not None:
            launch.event.synchronize()
        if self._uncollected[launch.stage] is launch:
            self._uncollected[launch.stage] = None
        launch.collected = True
        return self.inputs.out[launch.stage][: launch.rows].tolist()

    def decode(
        self, token_ids: Sequence[int], positions: Sequence[int], rope_deltas: Sequence[int]
    ) -> torch.Tensor:
        """Next-token logits ``[rows, vocab]`` (float32, a fresh tensor) for rows in slots
        ``0..rows-1``; row ``i`` feeds ``token_ids[i]`` at ``positions[i]`` (synchronous;
        tests and the decode-step benchmark). Greedy: ``next_ids`` gets the argmax."""
        self.drain()
        rows = len(token_ids)
        launch = self.launch(DecodeRows.fresh(token_ids, positions, rope_deltas))
        logits = self._last_logits(launch.shape)
        result = logits[:rows].to(torch.float32, copy=True)
        self.collect(launch)
        return result

    def drain(self) -> None:
        """Collect every launch not collected yet (their tokens are dropped)."""
        for launch in list(self._uncollected):
            if launch is not None:
                self.collect(launch)

    def warmup(self) -> int:
        """Run (CPU, eager CUDA) or capture (CUDA graphs) every shape once, largest batch
        first so smaller graphs reuse the pool; with ``capture_sampling`` the sampling
        variant of each shape too. Safe only while no request is decoding: padded rows
        write the scratch slot only, but this is where graphs are made.

        If compiling fails (a compiler missing on the host, an unsupported kernel), the
        layers stay eager for every bucket and ``compile_error`` says why."""
        self.drain()
        variants = (False, True) if self.capture_sampling else (False,)
        for batch, kv_len in sorted(self.shapes, reverse=True):
            for sampled in variants:
                empty = DecodeRows([], [], [], [], [] if sampled else None)
                self.inputs.fill(0, empty)
                try:
                    self._run((batch, kv_len, sampled))
                except Exception as exc:
                    if self._compiled_layer is None or batch in self.eager_batch_sizes:
                        raise
                    logger.exception("compiling the decode layer failed; layers stay eager")
                    self.compile_error = f"{type(exc).__name__}: {exc}"
                    self._compiled_layer = None
                    self._fns.clear()
                    self._graphs.clear()
                    return self.warmup()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return len(self.shapes)

    # ------------------------------------------------------------------ internals
    @torch.inference_mode()
    def _run(self, shape: Shape) -> torch.Tensor:
        self.runs[shape[:2]] += 1
        if not self.use_graphs:
            out = self._fn(shape)()
            self._eager_out = out
            return out
        entry = self._graphs.get(shape)
        if entry is None:
            entry = self._graphs[shape] = self._capture(shape)
        graph, out = entry
        graph.replay()
        return out

    def _last_logits(self, shape: Shape) -> torch.Tensor:
        if self.use_graphs:
            return self._graphs[shape][1]
        return self._eager_out

    def _fn(self, shape: Shape) -> StepFn:
        fn = self._fns.get(shape)
        if fn is None:
            fn = self._fns[shape] = self._make_step(*shape)
        return fn

    def _capture(self, shape: Shape) -> tuple[Any, torch.Tensor]:
        """Capture one shape. The buffers' current contents are used for the warm-up runs,
        so they must hold real rows or all padding."""
        fn = self._fn(shape)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # Warm-up on a side stream (lazy cuBLAS/allocator set-up, compile) before capture.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the worker's heartbeat thread may query the device meanwhile.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = fn()
        logger.debug("captured decode graph batch=%d kv_len=%d sampling=%s", *shape)
        return graph, out

    def _make_step(self, batch: int, kv_len: int, sampled: bool) -> StepFn:
        """The step of one shape: a closure over the static buffers only (see module doc)."""
        weights, cache, inputs = self.weights, self.cache, self.inputs
        layer = self._eager_layer
        compiled = self._compiled_layer is not None and batch not in self.eager_batch_sizes
        if compiled and self._compiled_layer is not None:
            layer = self._compiled_layer
        ints, floats, next_ids = inputs.ints, inputs.floats, inputs.next_ids
        host_ids = ints[StaticDecodeInputs.HOST_IDS, :batch]
        sources = ints[StaticDecodeInputs.SRC, :batch]
        write_pos = ints[StaticDecodeInputs.WRITE_POS, :batch]
        rope_pos = ints[StaticDecodeInputs.ROPE_POS, :batch].view(1, batch, 1).expand(3, -1, -1)
        write_slot = ints[StaticDecodeInputs.WRITE_SLOT, :batch]
        temperature = floats[StaticDecodeInputs.TEMPERATURE, :batch]
        top_p = floats[StaticDecodeInputs.TOP_P, :batch]
        uniform = floats[StaticDecodeInputs.UNIFORM, :batch]
        kv_positions = inputs.kv_positions[:kv_len].view(1, kv_len)
        keys, values = cache.keys, cache.values
        layer_args = [w.args() for w in weights.layers]

        def step() -> torch.Tensor:
            ids = torch.where(sources >= 0, next_ids.gather(0, sources.clamp(min=0)), host_ids)
            hidden = weights.embed(ids)
            cos, sin = weights.rotary(hidden[:, None], position_ids=rope_pos)
            visible = kv_positions <= write_pos.view(batch, 1)
            if compiled:
                # Batch and KV length are symbols in the compiled layer: one compilation
                # serves every bucket (batch 1 gets its own, specialised).
                for tensor in (hidden, cos, sin, visible, write_slot, write_pos):
                    torch._dynamo.maybe_mark_dynamic(tensor, 0)
                torch._dynamo.maybe_mark_dynamic(visible, 1)
            for index, args in enumerate(layer_args):
                hidden = layer(
                    hidden,
                    cos,
                    sin,
                    visible,
                    write_slot,
                    write_pos,
                    keys[index],
                    values[index],
                    *args,
                )
            logits = weights.logits(hidden)
            if sampled:
                tokens = choose_tokens(logits, temperature, top_p, uniform)
            else:
                tokens = logits.argmax(dim=-1)
            next_ids[:batch].copy_(tokens)
            return logits

        return step


def _raise_recompile_limit(needed: int) -> None:
    """Let dynamo keep ``needed`` specialisations of the same code (process-wide setting)."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name) and getattr(dynamo_config, name) < needed:
            setattr(dynamo_config, name, needed)
