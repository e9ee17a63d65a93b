"""The text model's forward for serving: fused weights, a packed prefill, a one-layer decode.

``Glm4vTextModel.forward`` is written for one batch of equal-length rows and a cache object
per request. A serving step has neither: it prefills pieces of several prompts at once
(each into its own KV slot) and decodes one token for every running request. Calling the
model's forward for that costs, per layer, three Q/K/V projections instead of one, a
boolean 4D mask (which rules out the flash kernel), KV heads repeated 16 times, and some 60
small eager kernels; on an H200 the decode step took 11.7 ms against a 4.8 ms memory floor
and a 619-token prefill 56 ms against a ~16 ms compute floor (shared/notes/h200.md).

So this module computes the same arithmetic, step for step (``Glm4vTextDecoderLayer``,
``Glm4vTextAttention``, ``Glm4vRMSNorm`` of transformers 5.24), over the model's own
weights, shaped for serving:

- ``TextWeights``: per layer, Q, K and V as one ``[q + 2 kv, hidden]`` projection (the
  model's three ``Linear`` weights become views of it, so no memory is added and the model
  itself, used by ``generate`` and the reference tests, still works);
- ``prefill_packed``: the chunks of several prompts as one packed sequence: every
  projection and the MLP are one GEMM over all their tokens, keys and values are written
  straight into each request's KV slot, attention runs per chunk with the flash kernel
  (causal, grouped KV heads; a chunk that continues an earlier one attends to its slot's
  prefix with a lower-right causal mask);
- ``make_decode_layer``: one layer of a decode step for a batch of rows, KV write
  included, over tensors only, so that ``torch.compile`` traces it once (dynamic batch and
  KV length) and every layer of every shape reuses the compiled code, and the whole step can
  be captured as one CUDA graph.

Invariant shared by both: position ``p`` of slot ``s`` holds the key/value of token ``p`` of
the request owning ``s``; nothing at positions ``>=`` the request's length is ever read
unmasked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.glm4v.modeling_glm4v import apply_rotary_pos_emb

# Decode attention kernels (``EngineConfig.decode_attention``); chosen per GPU by measuring.
DECODE_ATTENTION = ("grouped", "sdpa", "flex")


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``Glm4vRMSNorm.forward``: float32 statistics, the weight applied in the input dtype."""
    dtype = hidden.dtype
    x = hidden.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's weights, in the order ``args()`` hands them to the layer code."""

    input_norm: torch.Tensor
    qkv: torch.Tensor  # [q + 2 kv, hidden]: the model's q/k/v weights are views of it
    qkv_bias: torch.Tensor | None
    o_proj: torch.Tensor
    attn_out_norm: torch.Tensor  # post_self_attn_layernorm
    mlp_in_norm: torch.Tensor  # post_attention_layernorm
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor
    mlp_out_norm: torch.Tensor  # post_mlp_layernorm

    def args(self) -> tuple[torch.Tensor | None, ...]:
        return (
            self.input_norm,
            self.qkv,
            self.qkv_bias,
            self.o_proj,
            self.attn_out_norm,
            self.mlp_in_norm,
            self.gate_up,
            self.down,
            self.mlp_out_norm,
        )


def fuse_linears(linears: Sequence[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for ``linears`` stacked on the output dimension; each module's
    own parameters become views of it (same values, no extra memory). Run it once per model
    (``ModelRunner`` does): fusing again would leave the first fused copy to whoever holds it."""
    weight = torch.cat([linear.weight.detach() for linear in linears])
    has_bias = [linear.bias is not None for linear in linears]
    bias = None
    if all(has_bias):
        bias = torch.cat([linear.bias.detach() for linear in linears if linear.bias is not None])
    elif any(has_bias):
        raise ValueError("cannot fuse projections where only some have a bias")
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = nn.Parameter(weight[start : start + rows], requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias[start : start + rows], requires_grad=False)
        start += rows
    return weight, bias


class TextWeights:
    """The text model's weights and shape constants, read once from the model (fusing its
    Q/K/V projections: build one per model)."""

    def __init__(self, model: Any) -> None:
        text = model.model.language_model
        config = model.config.get_text_config()
        self.embed = text.embed_tokens
        self.rotary = text.rotary_emb
        self.final_norm = text.norm.weight
        self.lm_head = model.lm_head.weight
        self.eps = float(config.rms_norm_eps)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.hidden = int(config.hidden_size)
        self.intermediate = int(config.intermediate_size)
        self.scaling = self.head_dim**-0.5
        self.activation: Callable[[torch.Tensor], torch.Tensor] = text.layers[0].mlp.activation_fn
        self.layers: list[LayerWeights] = []
        for layer in text.layers:
            attention = layer.self_attn
            qkv, qkv_bias = fuse_linears([attention.q_proj, attention.k_proj, attention.v_proj])
            self.layers.append(
                LayerWeights(
                    input_norm=layer.input_layernorm.weight,
                    qkv=qkv,
                    qkv_bias=qkv_bias,
                    o_proj=attention.o_proj.weight,
                    attn_out_norm=layer.post_self_attn_layernorm.weight,
                    mlp_in_norm=layer.post_attention_layernorm.weight,
                    gate_up=layer.mlp.gate_up_proj.weight,
                    down=layer.mlp.down_proj.weight,
                    mlp_out_norm=layer.post_mlp_layernorm.weight,
                )
            )

    @property
    def q_size(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.kv_heads * self.head_dim

    def flops_per_token(self) -> float:
        """Multiply-adds x2 of one token through every layer's projections and MLP."""
        per_layer = sum(
            w.qkv.numel() + w.o_proj.numel() + w.gate_up.numel() + w.down.numel()
            for w in self.layers[:1]
        )
        return 2.0 * per_layer * len(self.layers)

    def attention_flops(self, queries: int, prefix: int) -> float:
        """Score and value products of ``queries`` causal tokens after ``prefix`` cached."""
        keys = queries * prefix + queries * (queries + 1) / 2
        return 4.0 * keys * self.q_size * len(self.layers)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``lm_head(norm(hidden))`` in the model dtype."""
        return F.linear(rms_norm(hidden, self.final_norm, self.eps), self.lm_head)


# ---------------------------------------------------------------------------- prefill
@dataclass(frozen=True)
class PackedChunk:
    """One prompt's positions ``start..end-1`` in a packed prefill, written into ``slot``."""

    slot: int
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


def _chunk_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cached: tuple[torch.Tensor, torch.Tensor] | None,
    *,
    scaling: float,
) -> torch.Tensor:
    """Causal attention of one chunk ``[1, H, L, D]``; returns ``[1, L, H*D]``.

    ``cached``: the slot's keys/values ``[KVH, end, D]`` including this chunk, when the
    chunk continues an earlier one; then queries see the whole prefix (lower-right causal).
    """
    heads, length = query.shape[1], query.shape[2]
    if cached is None:
        # start == 0: plain causal self-attention; flash kernel with grouped KV heads.
        out = F.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, enable_gqa=True
        )
    else:
        from torch.nn.attention.bias import causal_lower_right

        keys, values = cached
        groups = heads // keys.shape[0]
        # Repeated by hand: the lower-right causal kernels' grouped-head support differs
        # between torch releases; a prefix chunk is rare enough for the copy not to matter.
        keys = keys.repeat_interleave(groups, dim=0)[None]
        values = values.repeat_interleave(groups, dim=0)[None]
        out = F.scaled_dot_product_attention(
            query,
            keys,
            values,
            attn_mask=causal_lower_right(length, keys.shape[2]),
            scale=scaling,
        )
    return out.transpose(1, 2).reshape(1, length, -1)


def make_prefill_parts(weights: TextWeights) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """A prefill layer's two halves around its attention, as functions of tensors:

    - ``pre(hidden [1, T, hidden], cos, sin, input_norm, qkv, qkv_bias)`` -> query
      ``[1, H, T, D]`` and key/value ``[1, KVH, T, D]``, rotary applied;
    - ``post(hidden, attended [1, T, H*D], o_proj, attn_out_norm, mlp_in_norm, gate_up, down,
      mlp_out_norm)`` -> the layer's output.

    The attention between them loops over the packed chunks (their number and lengths vary
    per step); these two do not, so ``torch.compile`` (dynamic in ``T``) fuses their norms,
    rotary, residual adds and activation into a few kernels, shared by every layer.
    """
    q_size, kv_size, head_dim = weights.q_size, weights.kv_size, weights.head_dim
    eps, activation = weights.eps, weights.activation

    def pre(
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        input_norm: torch.Tensor,
        qkv_weight: torch.Tensor,
        qkv_bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        total = hidden.shape[1]
        qkv = F.linear(rms_norm(hidden, input_norm, eps), qkv_weight, qkv_bias)
        query = qkv[..., :q_size].view(1, total, -1, head_dim).transpose(1, 2)
        key = qkv[..., q_size : q_size + kv_size].view(1, total, -1, head_dim).transpose(1, 2)
        value = qkv[..., q_size + kv_size :].view(1, total, -1, head_dim).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        return query, key, value

    def post(
        hidden: torch.Tensor,
        attended: torch.Tensor,
        o_proj: torch.Tensor,
        attn_out_norm: torch.Tensor,
        mlp_in_norm: torch.Tensor,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        mlp_out_norm: torch.Tensor,
    ) -> torch.Tensor:
        hidden = hidden + rms_norm(F.linear(attended, o_proj), attn_out_norm, eps)
        gate, up = F.linear(rms_norm(hidden, mlp_in_norm, eps), gate_up).chunk(2, dim=-1)
        mlp = F.linear(up * activation(gate), down)
        return hidden + rms_norm(mlp, mlp_out_norm, eps)

    return pre, post


@torch.inference_mode()
def prefill_packed(
    weights: TextWeights,
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    embeds: torch.Tensor,
    positions: torch.Tensor,
    chunks: Sequence[PackedChunk],
    *,
    last_rows: Sequence[int],
    parts: tuple[Callable[..., Any], Callable[..., Any]] | None = None,
    dynamic: bool = False,
) -> torch.Tensor:
    """Run the packed ``chunks`` through every layer; logits of the rows ``last_rows``.

    ``embeds`` ``[T, hidden]`` and M-RoPE ``positions`` ``[3, T]`` are the chunks' tokens
    back to back (``T = sum of chunk lengths``); ``keys[l]``/``values[l]`` are layer ``l``'s
    KV buffers ``[slots, KVH, max_len, D]``. ``parts``: the layer halves
    (``make_prefill_parts``, compiled or not; default: built here, eager); ``dynamic``: mark
    ``T`` dynamic for compiled parts. Returns ``[len(last_rows), vocab]`` logits in the model
    dtype (one per prompt this call completes).
    """
    pre, post = parts or make_prefill_parts(weights)
    device = embeds.device
    total = embeds.shape[0]
    slot_index = torch.cat([torch.full((c.length,), c.slot, dtype=torch.long) for c in chunks]).to(
        device, non_blocking=True
    )
    pos_index = torch.cat([torch.arange(c.start, c.end) for c in chunks]).to(
        device, non_blocking=True
    )
    hidden = embeds.view(1, total, -1)
    cos, sin = weights.rotary(hidden, position_ids=positions.view(3, 1, total))
    if dynamic:
        for tensor in (hidden, cos, sin):
            torch._dynamo.maybe_mark_dynamic(tensor, 1)
    bounds = []
    offset = 0
    for chunk in chunks:
        bounds.append((offset, offset + chunk.length))
        offset += chunk.length
    for index, w in enumerate(weights.layers):
        query, key, value = pre(hidden, cos, sin, w.input_norm, w.qkv, w.qkv_bias)
        layer_keys, layer_values = keys[index], values[index]
        layer_keys[slot_index, :, pos_index] = key[0].transpose(0, 1)
        layer_values[slot_index, :, pos_index] = value[0].transpose(0, 1)
        parts_out = []
        for chunk, (a, b) in zip(chunks, bounds, strict=True):
            cached = None
            if chunk.start > 0:
                cached = (
                    layer_keys[chunk.slot, :, : chunk.end],
                    layer_values[chunk.slot, :, : chunk.end],
                )
            parts_out.append(
                _chunk_attention(
                    query[:, :, a:b],
                    key[:, :, a:b],
                    value[:, :, a:b],
                    cached,
                    scaling=weights.scaling,
                )
            )
        attended = parts_out[0] if len(parts_out) == 1 else torch.cat(parts_out, dim=1)
        if dynamic:
            torch._dynamo.maybe_mark_dynamic(attended, 1)
        hidden = post(
            hidden,
            attended,
            w.o_proj,
            w.attn_out_norm,
            w.mlp_in_norm,
            w.gate_up,
            w.down,
            w.mlp_out_norm,
        )
    rows = torch.tensor(list(last_rows), dtype=torch.long).to(device, non_blocking=True)
    return weights.logits(hidden[0].index_select(0, rows))


# ---------------------------------------------------------------------------- decode
# KV positions per FlexAttention block in the decode step: a row reads only the blocks up to
# its own length, so a short stream in a batch with a long one does not pay for the long one.
FLEX_KV_BLOCK = 128


def _flex_decode(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    visible: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Grouped-query decode attention with FlexAttention over each row's own KV blocks.

    The block mask is built from the rows' lengths inside the step (tensors only, so it is
    captured with the graph): row ``b`` visits ``ceil(length_b / block)`` blocks, and the
    mask function cuts the last one at its length.
    """
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    batch, kv_len = visible.shape
    block = min(FLEX_KV_BLOCK, kv_len)
    blocks = (kv_len + block - 1) // block
    lengths = visible.sum(-1)

    def within_length(
        b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        return kv_idx < lengths[b]

    kv_num_blocks = ((lengths + block - 1) // block).clamp(max=blocks).to(torch.int32)
    kv_indices = torch.arange(blocks, device=visible.device, dtype=torch.int32)
    block_mask = BlockMask.from_kv_blocks(
        kv_num_blocks.view(batch, 1, 1),
        kv_indices.view(1, 1, 1, blocks).expand(batch, 1, 1, blocks),
        BLOCK_SIZE=(block, block),
        mask_mod=within_length,
        seq_lengths=(query.shape[2], kv_len),
    )
    return flex_attention(
        query, keys, values, block_mask=block_mask, scale=scaling, enable_gqa=True
    )


def make_decode_layer(weights: TextWeights, attention: str) -> Callable[..., torch.Tensor]:
    """One decoder layer of a decode step, as a function of tensors only.

    ``layer(hidden [B, hidden], cos, sin [B, 1, rot], visible [B, S] bool, write_slot [B],
    write_pos [B], k_cache, v_cache [slots, KVH, max_len, D], *LayerWeights.args())``:
    writes row ``i``'s key/value at ``(write_slot[i], write_pos[i])``, attends row ``i``
    over positions ``0..S-1`` of slot ``i`` where ``visible``, returns the layer's output.

    Free of host synchronisation and data-dependent Python, and it mutates only whole
    input tensors (the cache buffers): ``torch.compile`` turns the write into an in-place
    scatter (a mutated *view* of a larger buffer would be copied whole by the compiled
    code, hence one buffer per layer in ``SlotKVCache``).
    """
    if attention not in DECODE_ATTENTION:
        raise ValueError(f"decode attention must be one of {DECODE_ATTENTION}")
    heads, kv_heads, head_dim = weights.heads, weights.kv_heads, weights.head_dim
    groups = heads // kv_heads
    q_size, kv_size = weights.q_size, weights.kv_size
    eps, scaling, activation = weights.eps, weights.scaling, weights.activation

    def attend(
        query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, visible: torch.Tensor
    ) -> torch.Tensor:
        batch, kv_len = visible.shape
        keys = k_cache[:batch, :, :kv_len]
        values = v_cache[:batch, :, :kv_len]
        if attention == "sdpa":
            out = F.scaled_dot_product_attention(
                query,
                keys,
                values,
                attn_mask=visible[:, None, None, :],
                scale=scaling,
                enable_gqa=True,
            )
            return out.reshape(batch, heads * head_dim)
        if attention == "flex":
            out = _flex_decode(query, keys, values, visible, scaling)
            return out.reshape(batch, heads * head_dim)
        # grouped: the G query heads of a KV head are G query rows against its keys.
        q = query.reshape(batch, kv_heads, groups, head_dim)
        scores = torch.matmul(q, keys.transpose(-1, -2)) * scaling  # [B, KVH, G, S]
        scores = scores.masked_fill(~visible[:, None, None, :], torch.finfo(scores.dtype).min)
        low = query.dtype in (torch.float16, torch.bfloat16)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32 if low else None)
        out = torch.matmul(probs.to(values.dtype), values)  # [B, KVH, G, D]
        return out.reshape(batch, heads * head_dim)

    def layer(
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        visible: torch.Tensor,
        write_slot: torch.Tensor,
        write_pos: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        input_norm: torch.Tensor,
        qkv_weight: torch.Tensor,
        qkv_bias: torch.Tensor | None,
        o_proj: torch.Tensor,
        attn_out_norm: torch.Tensor,
        mlp_in_norm: torch.Tensor,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        mlp_out_norm: torch.Tensor,
    ) -> torch.Tensor:
        batch = hidden.shape[0]
        qkv = F.linear(rms_norm(hidden, input_norm, eps), qkv_weight, qkv_bias)
        query = qkv[:, :q_size].view(batch, heads, 1, head_dim)
        key = qkv[:, q_size : q_size + kv_size].view(batch, kv_heads, 1, head_dim)
        value = qkv[:, q_size + kv_size :].view(batch, kv_heads, head_dim)
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        # Advanced indices split by a slice put the batch first: [B, KVH, D].
        k_cache[write_slot, :, write_pos] = key[:, :, 0]
        v_cache[write_slot, :, write_pos] = value
        out = F.linear(attend(query, k_cache, v_cache, visible), o_proj)
        hidden = hidden + rms_norm(out, attn_out_norm, eps)
        gate, up = F.linear(rms_norm(hidden, mlp_in_norm, eps), gate_up).chunk(2, dim=-1)
        mlp = F.linear(up * activation(gate), down)
        return hidden + rms_norm(mlp, mlp_out_norm, eps)

    return layer
