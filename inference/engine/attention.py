"""Grouped-query attention for the decode step, registered through transformers' interface.

GLM-4.6V has 32 query heads over 2 KV heads. With a mask, transformers' SDPA path repeats
each KV head 16 times before attention (``repeat_kv``): 16x the KV traffic of a decode step,
which is memory-bound (shared/notes/glm4v.md: 42.5 ms -> 15.4 ms per step at batch 32 on an
H100 once the heads are grouped). ``grouped_attention`` instead views the query heads of
one KV head as extra query rows: one matmul against the unexpanded cache, a masked softmax,
one matmul.

Head layout (the same as ``repeat_kv``): query head ``h`` reads KV head ``h // groups``.

The function is registered once as ``GROUPED_ATTENTION`` in ``AttentionInterface`` (and its
mask function in ``AttentionMaskInterface``, though the engine always passes a ready 4D mask).
Only the decode step (``DecodeForward``) calls it by that name; ``model.generate``, the
prefill and the vision tower keep the model's own attention (SDPA).
"""

from __future__ import annotations

from typing import Any

import torch

GROUPED_ATTENTION = "engine_grouped"
_registered = False


def grouped_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention without expanding the KV heads.

    Shapes: ``query [B, H, Q, D]``, ``key``/``value`` ``[B, KVH, S, D]`` with ``H = KVH * G``;
    ``attention_mask`` ``[B, 1, Q, S]``, boolean (True = attend) or additive float, or None
    (then causal over the last ``Q`` positions, as SDPA's ``is_causal`` for a prefill).
    Returns ``([B, Q, H, D], None)`` like transformers' attention functions.

    Invariant: every query row must see at least one key (a fully masked row would be NaN);
    the engine's padded decode rows see position 0 of some slot.
    """
    batch, heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    if scaling is None:
        scaling = head_dim**-0.5
    # [B, H, Q, D] -> [B, KVH, G*Q, D]: the G heads of one KV head become extra rows.
    q = query.reshape(batch, kv_heads, groups * q_len, head_dim)
    scores = torch.matmul(q, key.transpose(-1, -2)) * scaling  # [B, KVH, G*Q, S]
    scores = scores.view(batch, kv_heads, groups, q_len, kv_len)
    if attention_mask is None:
        visible = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(
            kv_len - q_len
        )
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    elif attention_mask.dtype == torch.bool:
        mask = attention_mask[:, :, None, :, :]  # [B, 1, 1, Q, S]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask[:, :, None, :, :]
    # Low-precision inputs take the softmax in float32 (as eager attention does).
    softmax_dtype = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else None
    probs = torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(value.dtype)
    out = torch.matmul(probs.view(batch, kv_heads, groups * q_len, kv_len), value)
    out = out.view(batch, heads, q_len, head_dim).transpose(1, 2).contiguous()
    return out, None


def register_grouped_attention() -> str:
    """Register ``grouped_attention`` (idempotent); returns its implementation name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(GROUPED_ATTENTION, grouped_attention)
        AttentionMaskInterface.register(GROUPED_ATTENTION, sdpa_mask)
        _registered = True
    return GROUPED_ATTENTION
