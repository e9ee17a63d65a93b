"""How many KV slots an engine allocates, once, at start.

On CPU the number comes from the configuration (``num_slots``, else ``max_batch_size``). On
CUDA it is also bounded by memory: after the model is loaded, ``gpu_memory_fraction`` of the
free memory, less what the image-embedding cache may take, is the KV budget; each slot costs
``2 * layers * kv_heads * max_len * head_dim * dtype size`` bytes (keys and values), plus one
scratch slot. What the fraction leaves over is for activations (a prefill chunk, the vision
tower on a large image) and the CUDA graphs' pool.

More slots than the batch limit would never be used at once (running plus prefilling
requests are bounded by it), so the count is capped there.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


class KVBudgetError(RuntimeError):
    """Not even one KV slot fits: the engine cannot serve with this configuration."""


def plan_num_slots(
    *,
    requested: int | None,
    max_batch_size: int,
    bytes_per_slot: int,
    free_bytes: int | None,
    memory_fraction: float,
    reserved_bytes: int = 0,
) -> int:
    """Slots to allocate. ``free_bytes`` None (CPU): ``requested or max_batch_size``.

    Raises ``KVBudgetError`` when the budget holds less than one slot (plus the scratch one).
    """
    wanted = requested or max_batch_size
    if free_bytes is None:
        return wanted
    budget = int(free_bytes * memory_fraction) - reserved_bytes
    fit = budget // bytes_per_slot - 1  # one scratch slot
    if fit < 1:
        raise KVBudgetError(
            f"KV budget {max(budget, 0) / 2**30:.2f} GiB ({memory_fraction:.0%} of "
            f"{free_bytes / 2**30:.2f} GiB free, less {reserved_bytes / 2**30:.2f} GiB reserved) "
            f"holds no slot of {bytes_per_slot / 2**30:.2f} GiB; lower max_seq_len or raise "
            "gpu_memory_fraction"
        )
    if fit < wanted:
        logger.warning(
            "KV memory holds %d slots of %d wanted; the batch limit drops to %d", fit, wanted, fit
        )
    return min(wanted, fit)
