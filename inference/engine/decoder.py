"""Fixed-shape decode: batch and KV-length buckets, static input buffers, CUDA graphs.

One decode step runs every decoding request (row ``i`` in KV slot ``i``) through the text
model and ``lm_head``. The shapes are made fixed so that the step can be captured once per
shape and replayed:

- the batch is padded to the smallest *batch bucket* that holds it (default 1, 2, 4, 8, ...
  up to the engine's batch limit); padded rows feed token 0 at position 0 and write their
  key/value into the cache's scratch slot, so they never touch a request's slot; their
  logits are dropped;
- attention reads the first ``kv_len`` positions of each slot, ``kv_len`` the smallest
  *KV bucket* above the longest row (default 512, 1024, ... up to ``max_len``);
- every per-step input lives in one static ``[4, max_bucket]`` table (token id, write
  position, M-RoPE position, write slot) updated in place; the mask is computed inside the
  step from the write positions.

The step function of a shape is a closure over those buffers only: it takes no arguments
and reads no Python-side per-step state, and it never synchronises with the host (no
``.item()``, no data-dependent Python branch). That is what makes it capturable; on CPU the
same closure simply runs eagerly on the same buffers, so CPU tests exercise the exact code
that a GPU captures. On CUDA (``cuda_graphs=True``) each shape is captured on first use or by
``warmup()`` into ``torch.cuda.CUDAGraph`` sharing one memory pool, and replayed.

The step itself is ``DecodeForward``: the text model layer by layer, split around the KV
write. ``compile_batch_sizes`` runs the step of those batch buckets with its two per-layer
parts compiled (``torch.compile``, once per shape, shared by every layer) before capture.
Off by default: on an H100 compiling the whole step helped batch 1 and hurt batch 32
(shared/notes/glm4v.md), so it must be measured per bucket before it is turned on
(``benchmarks/engine.py --mode suite`` does).
"""

from __future__ import annotations

import bisect
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch

from inference.engine.decode_forward import DecodeForward
from inference.engine.kv_cache import SlotKVCache

logger = logging.getLogger(__name__)

StepFn = Callable[[], torch.Tensor]


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

    ``table`` rows: 0 token id, 1 write position (the row's cached length), 2 M-RoPE position
    (write position + rope delta, all three axes), 3 write slot (``i`` or scratch).
    """

    IDS, WRITE_POS, ROPE_POS, WRITE_SLOT = range(4)

    def __init__(self, max_batch: int, max_len: int, scratch: int, device: torch.device) -> None:
        self.max_batch = max_batch
        self.scratch = scratch
        self.table = torch.zeros(4, max_batch, dtype=torch.long, device=device)
        self.kv_positions = torch.arange(max_len, dtype=torch.long, device=device)
        pin = device.type == "cuda"
        self._host = torch.zeros(4, max_batch, dtype=torch.long, pin_memory=pin)
        self.fill([], [], [])

    def fill(
        self, token_ids: Sequence[int], positions: Sequence[int], rope_deltas: Sequence[int]
    ) -> None:
        """Rows ``0..n-1`` from the arguments (row ``i`` writes slot ``i``); the rest padding."""
        n = len(token_ids)
        if n > self.max_batch:
            raise ValueError(f"{n} rows exceed the largest bucket {self.max_batch}")
        host = self._host
        host.zero_()
        host[self.WRITE_SLOT].fill_(self.scratch)
        if n:
            rope = [p + d for p, d in zip(positions, rope_deltas, strict=True)]
            host[: self.WRITE_SLOT, :n] = torch.tensor(
                [list(token_ids), list(positions), rope], dtype=torch.long
            )
            host[self.WRITE_SLOT, :n] = torch.arange(n)
        # One small host-to-device copy per step; synchronous so the host table can be
        # rewritten next step without waiting for anything.
        self.table.copy_(host)


class BucketedDecoder:
    """Runs decode steps at bucketed shapes over ``StaticDecodeInputs``. Not thread-safe."""

    def __init__(
        self,
        runner: Any,
        cache: SlotKVCache,
        *,
        batch_sizes: Sequence[int],
        kv_lengths: Sequence[int],
        attention: str | None,
        cuda_graphs: bool = True,
        compile_batch_sizes: Sequence[int] = (),
        compile_mode: str | None = None,
        compile_backend: str = "inductor",
        compile_cache_dir: str | None = None,
    ) -> None:
        self.runner = runner
        self.cache = cache
        self.batch_sizes = tuple(batch_sizes)
        self.kv_lengths = tuple(kv_lengths)
        if self.batch_sizes[-1] > cache.num_slots:
            raise ValueError("a batch bucket is larger than the number of KV slots")
        self.attention = attention
        self.device = cache.keys.device
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self.compile_batch_sizes = frozenset(compile_batch_sizes)
        attention_name = attention or runner.attention
        self._forward = DecodeForward(runner.model, attention_name)
        self._forward_compiled: DecodeForward | None = None
        if self.compile_batch_sizes:
            # Each (batch, kv_len) shape is its own specialisation: let dynamo keep them all.
            _raise_recompile_limit(len(batch_sizes) * len(kv_lengths))
            if compile_cache_dir:
                # Inductor reads its cache location from the environment when it compiles.
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = compile_cache_dir
            options = {"mode": compile_mode, "backend": compile_backend, "dynamic": False}
            self._forward_compiled = DecodeForward(
                runner.model, attention_name, compile_options=options
            )
        self.inputs = StaticDecodeInputs(
            self.batch_sizes[-1], cache.max_len, cache.scratch, self.device
        )
        self._fns: dict[tuple[int, int], StepFn] = {}
        self._graphs: dict[tuple[int, int], tuple[Any, torch.Tensor]] = {}
        self._pool: Any = None
        self.runs: Counter[tuple[int, int]] = Counter()  # steps per (batch, kv_len) shape

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [(b, k) for b in self.batch_sizes for k in self.kv_lengths]

    def plan(self, rows: int, longest: int) -> tuple[int, int]:
        """(batch bucket, kv bucket) for ``rows`` rows whose largest write position is
        ``longest`` (the new token goes there, so ``kv_len > longest``)."""
        return pick_bucket(self.batch_sizes, rows), pick_bucket(self.kv_lengths, longest + 1)

    def decode(
        self, token_ids: Sequence[int], positions: Sequence[int], rope_deltas: Sequence[int]
    ) -> torch.Tensor:
        """Next-token logits ``[rows, vocab]`` (float32, a fresh tensor) for rows in slots
        ``0..rows-1``; row ``i`` feeds ``token_ids[i]`` at ``positions[i]``."""
        rows = len(token_ids)
        shape = self.plan(rows, max(positions))
        self.inputs.fill(token_ids, positions, rope_deltas)
        logits = self._run(shape)
        return logits[:rows].to(torch.float32, copy=True)

    def warmup(self) -> int:
        """Run (CPU, eager CUDA) or capture (CUDA graphs) every shape once, largest batch
        first so smaller graphs reuse the pool. Safe only while no request is decoding:
        padded rows write the scratch slot only, but this is where graphs are made."""
        for shape in sorted(self.shapes, reverse=True):
            self.inputs.fill([], [], [])
            self._run(shape)
        return len(self.shapes)

    # ------------------------------------------------------------------ internals
    @torch.inference_mode()
    def _run(self, shape: tuple[int, int]) -> torch.Tensor:
        self.runs[shape] += 1
        if not self.use_graphs:
            return self._fn(shape)()
        entry = self._graphs.get(shape)
        if entry is None:
            entry = self._graphs[shape] = self._capture(shape)
        graph, out = entry
        graph.replay()
        return out

    def _fn(self, shape: tuple[int, int]) -> StepFn:
        fn = self._fns.get(shape)
        if fn is None:
            fn = self._fns[shape] = self._make_step(*shape)
        return fn

    def _capture(self, shape: tuple[int, int]) -> tuple[Any, torch.Tensor]:
        """Capture one shape. The buffers' current contents are used for the warm-up runs,
        so ``fill`` must have left real rows consistent or all rows padding."""
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
        logger.debug("captured decode graph batch=%d kv_len=%d", *shape)
        return graph, out

    def _make_step(self, batch: int, kv_len: int) -> StepFn:
        """The step of one shape: a closure over the static buffers only (see module doc)."""
        runner, cache, table = self.runner, self.cache, self.inputs.table
        forward = self._forward
        if batch in self.compile_batch_sizes and self._forward_compiled is not None:
            forward = self._forward_compiled
        ids = table[StaticDecodeInputs.IDS, :batch].view(batch, 1)
        write_pos = table[StaticDecodeInputs.WRITE_POS, :batch]
        rope_pos = table[StaticDecodeInputs.ROPE_POS, :batch].view(1, batch, 1).expand(3, -1, -1)
        write_slot = table[StaticDecodeInputs.WRITE_SLOT, :batch]
        kv_positions = self.inputs.kv_positions[:kv_len].view(1, kv_len)
        additive = runner.additive_mask(self.attention)
        dtype = runner.dtype

        def step() -> torch.Tensor:
            visible = (kv_positions <= write_pos.view(batch, 1)).view(batch, 1, 1, kv_len)
            mask = visible
            if additive:
                mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
                mask = mask.masked_fill(~visible, torch.finfo(dtype).min)
            view = cache.batch_view(write_slot, write_pos, batch, kv_len)
            return forward(ids, rope_pos, mask, view)

        return step


def _raise_recompile_limit(needed: int) -> None:
    """Let dynamo keep ``needed`` specialisations of the same code (process-wide setting)."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name) and getattr(dynamo_config, name) < needed + 8:
            setattr(dynamo_config, name, needed + 8)
