"""KV slot ownership, and the compaction that lets a decode step read its slots as one view.

Decoding requests live in the low slots, prefilling ones are placed high: ``acquire`` hands
out the highest free slot. Before each decode step ``compact`` restores the invariant the
decoder relies on: the ``n`` decoding requests own exactly slots ``0..n-1``, in row order.
It moves a request's cached keys/values (``cached_len`` positions) into a hole left by a
finished one, or swaps with a prefilling request that sits in the hole. Moves are exact
copies; positions live in the rotary-embedded keys, not in the slot index.
"""

from __future__ import annotations

from collections.abc import Iterable

from inference.engine.kv_cache import SlotKVCache
from inference.engine.sequence import Sequence


class SlotPool:
    """Which request owns which slot. Not thread-safe (the engine thread only)."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free = set(range(num_slots))
        self._owner: dict[int, Sequence] = {}
        self.moves = 0  # slot contents copied by compaction (tests, tracing)

    @property
    def free(self) -> int:
        return len(self._free)

    def acquire(self, seq: Sequence) -> int:
        """Give ``seq`` the highest free slot (raises when none is free)."""
        slot = max(self._free)
        self._free.remove(slot)
        self._owner[slot] = seq
        seq.slot = slot
        return slot

    def release(self, seq: Sequence) -> None:
        """Give back ``seq``'s slot, if it holds one."""
        if seq.slot >= 0 and self._owner.get(seq.slot) is seq:
            del self._owner[seq.slot]
            self._free.add(seq.slot)
        seq.slot = -1

    def compact(self, rows: Iterable[Sequence], cache: SlotKVCache) -> list[Sequence]:
        """Move the decoding ``rows`` into slots ``0..n-1``; return them sorted by slot."""
        rows = list(rows)
        n = len(rows)
        placed = {seq.slot for seq in rows if seq.slot < n}
        holes = [slot for slot in range(n) if slot not in placed]
        movers = sorted((seq for seq in rows if seq.slot >= n), key=lambda seq: seq.slot)
        for seq, hole in zip(movers, holes, strict=True):
            source = seq.slot
            other = self._owner.get(hole)
            if other is None:
                cache.move(source, hole, seq.cached_len)
                self._free.discard(hole)
                self._free.add(source)
                del self._owner[source]
            else:  # a prefilling request sits in the hole: trade places
                cache.swap(source, seq.cached_len, hole, other.cached_len)
                other.slot = source
                self._owner[source] = other
            self._owner[hole] = seq
            seq.slot = hole
            self.moves += 1
        return sorted(rows, key=lambda seq: seq.slot)
