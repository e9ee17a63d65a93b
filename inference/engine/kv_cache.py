"""Slot-based KV cache: one pre-allocated buffer, one fixed-size slot per request in flight.

Layout: ``keys`` and ``values`` are ``[layers, slots + 1, kv_heads, max_len, head_dim]``. A
request owns one slot from admission to finish; token ``t`` of its sequence (prompt then
completion) lives at ``[:, slot, :, t]``. The extra last slot (``scratch``) is never owned: the
padded rows of a decode bucket write there, and ``swap`` stages through it. Nothing is
allocated per step, so the memory bound is known at start and every decode input can be a
fixed-shape buffer (CUDA graphs).

Invariants:

- positions ``>= cached_len`` of a slot hold stale data from earlier owners (or zeros) and are
  always masked out; all written values are finite, so a masked position contributes
  exactly zero to attention;
- a decode step reads the slots ``0..batch-1`` as one view (no gather): the engine keeps its
  decoding requests in exactly those slots, row ``i`` in slot ``i`` (``SlotPool.compact``).
"""

from __future__ import annotations

from typing import Any

import torch


class SlotKVCache:
    """The whole KV memory of an engine; hands out the cache objects the attention layers use."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_slots: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_layers, num_slots + 1, kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.num_layers = num_layers
        self.num_slots = num_slots
        self.scratch = num_slots  # index of the never-owned slot
        self.max_len = max_len

    @staticmethod
    def bytes_per_slot(
        *, num_layers: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """Keys + values of one slot."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * kv_heads * max_len * head_dim * itemsize

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def chunk_view(self, slot: int, start: int, end: int) -> ChunkCache:
        """Cache for a prefill forward of positions ``start..end-1`` of the request in ``slot``.

        Positions ``< start`` must already hold this request's earlier chunks.
        """
        if not 0 <= start < end <= self.max_len:
            raise ValueError(f"chunk {start}..{end} outside a slot of {self.max_len}")
        return ChunkCache(self, slot, start, end)

    def batch_view(
        self, write_slots: torch.Tensor, write_positions: torch.Tensor, batch: int, kv_len: int
    ) -> BatchDecodeCache:
        """Cache for one decode forward of ``batch`` rows reading slots ``0..batch-1``.

        Row ``i`` writes its new key/value at ``(write_slots[i], write_positions[i])``; real
        rows write into their own slot ``i``, padded rows into ``scratch``.
        """
        return BatchDecodeCache(self, write_slots, write_positions, batch, kv_len)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst``."""
        if length > 0 and src != dst:
            self.keys[:, dst, :, :length].copy_(self.keys[:, src, :, :length])
            self.values[:, dst, :, :length].copy_(self.values[:, src, :, :length])

    def swap(self, a: int, length_a: int, b: int, length_b: int) -> None:
        """Exchange the contents of slots ``a`` and ``b`` (their first ``length_*`` positions)."""
        self.move(a, self.scratch, length_a)
        self.move(b, a, length_b)
        self.move(self.scratch, b, length_a)


class ChunkCache:
    """``update(key, value, layer_idx)`` for one prefill chunk of one request.

    Writes the chunk's keys/values straight into the slot (no per-request cache to copy
    later) and returns the slot's positions ``0..end-1``, ``[1, kv_heads, end, head_dim]``.
    """

    def __init__(self, cache: SlotKVCache, slot: int, start: int, end: int) -> None:
        self._cache, self._slot, self._start, self._end = cache, slot, start, end

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self._cache.keys[layer_idx, self._slot]
        values = self._cache.values[layer_idx, self._slot]
        keys[:, self._start : self._end].copy_(key_states[0])
        values[:, self._start : self._end].copy_(value_states[0])
        return keys[None, :, : self._end], values[None, :, : self._end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._start


class BatchDecodeCache:
    """``update(key, value, layer_idx)`` for one decode forward over slots ``0..batch-1``.

    Every index is a tensor, so the forward has no host synchronisation and the same object
    can be captured once in a CUDA graph and replayed with new buffer contents.
    Returns ``[batch, kv_heads, kv_len, head_dim]`` views of the buffer.
    """

    def __init__(
        self,
        cache: SlotKVCache,
        write_slots: torch.Tensor,
        write_positions: torch.Tensor,
        batch: int,
        kv_len: int,
    ) -> None:
        self._cache = cache
        self._slots = write_slots
        self._positions = write_positions
        self._batch = batch
        self._kv_len = kv_len

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self._cache.keys[layer_idx]
        values = self._cache.values[layer_idx]
        # key_states: [batch, kv_heads, 1, head_dim]; advanced indices (slot, position)
        # separated by a slice put the batch dimension first: [batch, kv_heads, head_dim].
        keys[self._slots, :, self._positions] = key_states[:, :, 0]
        values[self._slots, :, self._positions] = value_states[:, :, 0]
        return keys[: self._batch, :, : self._kv_len], values[: self._batch, :, : self._kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        # Lengths differ per row and live on the device; reading them would synchronise
        # (and break graph capture). The engine always passes positions and a 4D mask, so
        # the model has no reason to ask.
        raise NotImplementedError("BatchDecodeCache has per-row lengths; pass position_ids")
