"""Slot KV cache layout, slot moves and compaction, and the start-up slot budget."""

from __future__ import annotations

import pytest
import torch

from inference.engine.kv_cache import SlotKVCache
from inference.engine.memory import KVBudgetError, plan_num_slots
from inference.engine.sampling import RowSampler
from inference.engine.sequence import Sequence
from inference.engine.slots import SlotPool
from inference.protocol import SamplingParams
from tests.inference.conftest import chat_request


def _cache(num_slots=4, max_len=16):
    return SlotKVCache(
        num_layers=2,
        num_slots=num_slots,
        kv_heads=2,
        max_len=max_len,
        head_dim=3,
        dtype=torch.float64,
        device=torch.device("cpu"),
    )


def _seq(name, cached_len):
    seq = Sequence(
        request=chat_request(name, "hi"),
        images=None,
        sampler=RowSampler.for_params(SamplingParams(temperature=0.0)),
    )
    seq.cached_len = cached_len
    return seq


def _stamp(cache, slot, value, length):
    for keys, values in zip(cache.keys, cache.values, strict=True):
        keys[slot, :, :length] = value
        values[slot, :, :length] = -value


def _holds(cache, slot, value, length):
    return all(
        bool((keys[slot, :, :length] == value).all() and (values[slot, :, :length] == -value).all())
        for keys, values in zip(cache.keys, cache.values, strict=True)
    )


def test_one_buffer_per_layer_with_a_scratch_slot():
    """The compiled decode layer writes into whole per-layer buffers (a write into a view of
    one larger tensor would be copied whole); the scratch slot takes padded rows."""
    cache = _cache(num_slots=4, max_len=16)
    buffers = [*cache.keys, *cache.values]
    assert len(cache.keys) == len(cache.values) == 2
    assert all(t.shape == (5, 2, 16, 3) and t.dtype == torch.float64 for t in buffers)
    assert len({t.untyped_storage().data_ptr() for t in buffers}) == len(buffers)
    assert all(t.untyped_storage().nbytes() == t.nbytes for t in buffers)
    assert cache.scratch == 4 and cache.num_slots == 4
    per_slot = SlotKVCache.bytes_per_slot(
        num_layers=2, kv_heads=2, max_len=16, head_dim=3, dtype=torch.float64
    )
    assert cache.nbytes == 5 * per_slot == 5 * 2 * 2 * 2 * 16 * 3 * 8


def test_move_and_swap_copy_exactly():
    cache = _cache()
    _stamp(cache, 0, 1.5, 4)
    _stamp(cache, 3, 2.5, 7)
    cache.move(0, 1, 4)
    assert _holds(cache, 1, 1.5, 4) and _holds(cache, 0, 1.5, 4)
    cache.swap(1, 4, 3, 7)
    assert _holds(cache, 1, 2.5, 7) and _holds(cache, 3, 1.5, 4)
    assert _holds(cache, 2, 0.0, 16)  # a slot nobody named is untouched


def test_compaction_puts_decode_rows_in_the_low_slots():
    cache = _cache(num_slots=4)
    pool = SlotPool(4)
    a, b, c, prefilling = _seq("a", 3), _seq("b", 5), _seq("c", 2), _seq("p", 6)
    for seq in (a, b, c, prefilling):
        pool.acquire(seq)  # highest free first: a=3, b=2, c=1, p=0
    assert [s.slot for s in (a, b, c, prefilling)] == [3, 2, 1, 0]
    for seq, value in ((a, 1.0), (b, 2.0), (c, 3.0), (prefilling, 4.0)):
        _stamp(cache, seq.slot, value, seq.cached_len)
    pool.release(b)  # b finished: slot 2 is a hole
    rows = pool.compact([a, c], cache)
    assert [s.slot for s in rows] == [0, 1]
    # a moved into slot 0 by trading places with the prefilling request; c stayed.
    assert rows == [a, c] and prefilling.slot == 3 and pool.moves == 1
    assert _holds(cache, 0, 1.0, 3) and _holds(cache, 1, 3.0, 2) and _holds(cache, 3, 4.0, 6)
    assert pool.free == 1
    pool.release(a)
    rows = pool.compact([c, prefilling], cache)  # prefilling finished and joins the batch
    assert [s.slot for s in rows] == [0, 1] and rows == [prefilling, c]
    assert _holds(cache, 0, 4.0, 6) and _holds(cache, 1, 3.0, 2)
    assert pool.free == 2 and pool.compact(rows, cache) == rows and pool.moves == 2


def test_slot_budget_from_config_or_free_memory():
    per_slot = 100
    cpu = {"bytes_per_slot": per_slot, "free_bytes": None, "memory_fraction": 0.9}
    assert plan_num_slots(requested=None, max_batch_size=8, **cpu) == 8
    assert plan_num_slots(requested=3, max_batch_size=8, **cpu) == 3
    gpu = {"bytes_per_slot": per_slot, "memory_fraction": 0.5, "reserved_bytes": 100}
    # 0.5 * 2000 - 100 = 900 bytes: 9 slots, one of them scratch.
    assert plan_num_slots(requested=None, max_batch_size=32, free_bytes=2000, **gpu) == 8
    assert plan_num_slots(requested=None, max_batch_size=4, free_bytes=2000, **gpu) == 4
    with pytest.raises(KVBudgetError, match="max_seq_len"):
        plan_num_slots(requested=None, max_batch_size=4, free_bytes=300, **gpu)
