"""Slot-based KV cache: one pre-allocated buffer, one fixed-size slot per running request.

Layout: ``keys`` and ``values`` are ``[layers, slots, kv_heads, max_len, head_dim]``. A request
owns one slot from admission to finish; token ``t`` of its sequence (prompt then completion)
lives at ``[:, slot, :, t]``. Nothing is allocated per step, so the memory bound is known at
start and a decode step's inputs can become fixed-shape buffers (CUDA graphs) later.

Invariant: positions ``>= cached_len`` of a slot hold stale data from earlier owners (or zeros)
and are always masked out; all written values are finite, so a masked position contributes
exactly zero to attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class SlotKVCache:
    """The whole KV memory of an engine; hands out views for a prefill copy or a decode step."""

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
        shape = (num_layers, num_slots, kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.num_layers = num_layers
        self.num_slots = num_slots
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def write_prompt(self, slot: int, layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy a prefilled request's per-layer ``([1, kv_heads, L, head_dim], ...)`` into ``slot``."""
        for layer_idx, (key, value) in enumerate(layers):
            length = key.shape[-2]
            self.keys[layer_idx, slot, :, :length].copy_(key[0])
            self.values[layer_idx, slot, :, :length].copy_(value[0])

    def decode_view(
        self, slots: Sequence[int], positions: torch.Tensor, kv_len: int
    ) -> DecodeCache:
        """A cache object for one decode forward of the rows ``slots`` (row ``i`` -> ``slots[i]``).

        ``positions[i]`` is where row ``i``'s new key/value goes (its cached length);
        attention reads the first ``kv_len`` positions of each slot (``kv_len > max(positions)``).
        """
        return DecodeCache(self, slots, positions, kv_len)


class DecodeCache:
    """Implements the ``update(key, value, layer_idx, **kwargs)`` the attention layers call.

    Each row's one new key/value is written at that row's own position in its own slot, and
    the rows of this batch are returned, ``[batch, kv_heads, kv_len, head_dim]``. When the
    slots are exactly ``0..batch-1`` the return is a view (no gather copy).
    """

    def __init__(
        self, cache: SlotKVCache, slots: Sequence[int], positions: torch.Tensor, kv_len: int
    ) -> None:
        self._cache = cache
        device = cache.keys.device
        self._slot_index = torch.tensor(list(slots), dtype=torch.long, device=device)
        self._positions = positions.to(device=device, dtype=torch.long)
        self._kv_len = kv_len
        batch = len(slots)
        # Contiguous from 0: read a slice view instead of gathering every layer's rows.
        self._contiguous = list(slots) == list(range(batch))
        self._batch = batch

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self._cache.keys[layer_idx]
        values = self._cache.values[layer_idx]
        # key_states: [batch, kv_heads, 1, head_dim]; advanced indices (slot, position)
        # separated by a slice put the batch dimension first: [batch, kv_heads, head_dim].
        keys[self._slot_index, :, self._positions] = key_states[:, :, 0]
        values[self._slot_index, :, self._positions] = value_states[:, :, 0]
        if self._contiguous:
            return keys[: self._batch, :, : self._kv_len], values[: self._batch, :, : self._kv_len]
        return (
            keys[self._slot_index, :, : self._kv_len],
            values[self._slot_index, :, : self._kv_len],
        )

    # The text model asks a cache for its length only when it builds positions or a mask
    # itself; we always pass both, but answer sensibly in case a code path asks.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self._positions.max().item())
