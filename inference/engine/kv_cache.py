"""Slot-based KV cache: buffers allocated once, one fixed-size slot per request in flight.

Layout: ``keys[l]`` and ``values[l]`` are layer ``l``'s ``[slots + 1, kv_heads, max_len,
head_dim]`` buffers, one allocation per layer. A request owns one slot from admission to
finish; token ``t`` of its sequence (prompt then completion) lives at ``[slot, :, t]`` of
every layer. The extra last slot (``scratch``) is never owned: the padded rows of a decode
bucket write there, and ``swap`` stages through it. Nothing is allocated per step, so the
memory bound is known at start and every decode input can be a fixed-shape buffer (CUDA
graphs).

One buffer per layer, not one ``[layers, ...]`` tensor: the compiled decode layer writes into
the buffer it is given, and ``torch.compile`` turns a write into a whole input tensor into an
in-place scatter, but a write into a *view* of a larger tensor into a copy of all of it.

Invariants:

- positions ``>= cached_len`` of a slot hold stale data from earlier owners (or zeros) and are
  always masked out; all written values are finite, so a masked position contributes
  exactly zero to attention;
- a decode step reads the slots ``0..batch-1`` as one view (no gather): the engine keeps its
  decoding requests in exactly those slots, row ``i`` in slot ``i`` (``SlotPool.compact``).
"""

from __future__ import annotations

import torch


class SlotKVCache:
    """The whole KV memory of an engine."""

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
        shape = (num_slots + 1, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_layers = num_layers
        self.num_slots = num_slots
        self.scratch = num_slots  # index of the never-owned slot
        self.max_len = max_len
        self.device = device

    @staticmethod
    def bytes_per_slot(
        *, num_layers: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """Keys + values of one slot."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * kv_heads * max_len * head_dim * itemsize

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.keys) + sum(t.nbytes for t in self.values)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst``."""
        if length > 0 and src != dst:
            for buffer in (*self.keys, *self.values):
                buffer[dst, :, :length].copy_(buffer[src, :, :length])

    def swap(self, a: int, length_a: int, b: int, length_b: int) -> None:
        """Exchange the contents of slots ``a`` and ``b`` (their first ``length_*`` positions)."""
        self.move(a, self.scratch, length_a)
        self.move(b, a, length_b)
        self.move(self.scratch, b, length_a)
