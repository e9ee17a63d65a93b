"""The text model's forward for one decode step, split around the KV write.

A decode step runs every layer of the text model on one token per row. In eager mode each
layer is some 60 small kernels (four RMSNorms of several element-wise kernels each, the
rotary embedding, the masked softmax, the SwiGLU), so at the batch sizes of serving most of
a step is launch and tail time of tiny kernels, not reading the weights
(shared/notes/glm4v.md: 12.3 ms per step in a CUDA graph against a 6.9 ms weight-streaming
floor on an H100). ``torch.compile`` fuses those kernels, but compiling the whole step was
measured to help batch 1 and hurt batch 32 there.

So the step is cut where compilation is a risk and kept whole where it pays:

- ``pre_write``: input RMSNorm, the Q/K/V projections, the rotary embedding;
- the KV write (``BatchDecodeCache.update``): an in-place scatter into the engine's one KV
  buffer. It stays eager: a compiled graph that mutates a slice of a multi-gigabyte input
  risks a functionalised copy of it; eager it is two indexed writes per layer;
- ``post_write``: attention over the cached keys/values, the output projection, the other
  three RMSNorms, the MLP and both residual adds.

Neither compiled part reads anything layer-specific besides the layer's own weights (the
layer index is used only by the eager write), so ``torch.compile`` traces each part once per
shape and every layer reuses it (regional compilation: seconds per shape instead of
minutes for a 40-layer step).

Arithmetic is that of ``Glm4vTextDecoderLayer.forward`` and ``Glm4vTextAttention.forward``
(transformers 5.24) step for step; ``DecodeForward`` with no compilation gives bit-identical
logits to the model's own forward (tests/inference/test_decode_forward.py), and the engine's
greedy output stays equal to ``model.generate`` (tests/inference/test_engine_correctness.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.glm4v.modeling_glm4v import apply_rotary_pos_emb, eager_attention_forward

from inference.engine.kv_cache import BatchDecodeCache

PartFn = Callable[..., Any]


def pre_write(
    layer: Any, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values ``[batch, heads, 1, head_dim]`` of one layer, rotary applied."""
    attention = layer.self_attn
    normed = layer.input_layernorm(hidden)
    batch, q_len, _ = normed.shape
    shape = (batch, q_len, -1, attention.head_dim)
    query = attention.q_proj(normed).view(shape).transpose(1, 2)
    key = attention.k_proj(normed).view(shape).transpose(1, 2)
    value = attention.v_proj(normed).view(shape).transpose(1, 2)
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    return query, key, value


def post_write(
    layer: Any,
    attend: PartFn,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    residual: torch.Tensor,
) -> torch.Tensor:
    """The rest of one layer after its keys/values are in the cache: its output hidden state."""
    attention = layer.self_attn
    batch, _, q_len, _ = query.shape
    out, _ = attend(attention, query, keys, values, mask, dropout=0.0, scaling=attention.scaling)
    out = attention.o_proj(out.reshape(batch, q_len, -1).contiguous())
    hidden = residual + layer.post_self_attn_layernorm(out)
    mlp_out = layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden + layer.post_mlp_layernorm(mlp_out)


class DecodeForward:
    """One decode step of ``model`` (text model + ``lm_head``) over a ``BatchDecodeCache``.

    ``compile_options`` (``torch.compile`` keyword arguments) compiles ``pre_write`` and
    ``post_write``; None runs them eagerly. Host-synchronisation free, like the cache: the
    same call can be captured in a CUDA graph.
    """

    def __init__(
        self, model: Any, attention: str, *, compile_options: dict[str, Any] | None = None
    ) -> None:
        self.text = model.model.language_model
        self.lm_head = model.lm_head
        self.attention = attention
        self.compiled = compile_options is not None
        self._pre: PartFn = pre_write
        self._post: PartFn = post_write
        if compile_options is not None:
            self._pre = torch.compile(pre_write, **compile_options)
            self._post = torch.compile(post_write, **compile_options)

    def __call__(
        self,
        input_ids: torch.Tensor,
        rope_positions: torch.Tensor,
        mask: torch.Tensor,
        cache: BatchDecodeCache,
    ) -> torch.Tensor:
        """Next-token logits ``[batch, vocab]`` for ``input_ids`` ``[batch, 1]`` at M-RoPE
        ``rope_positions`` ``[3, batch, 1]``, attending where ``mask`` ``[batch, 1, 1, kv]``
        allows; each row's key/value goes where ``cache`` says."""
        # Looked up per call, as the model does, so a registered replacement takes effect.
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.attention, eager_attention_forward)
        hidden = self.text.embed_tokens(input_ids)
        cos, sin = self.text.rotary_emb(hidden, position_ids=rope_positions)
        for index, layer in enumerate(self.text.layers):
            query, key, value = self._pre(layer, hidden, cos, sin)
            keys, values = cache.update(key, value, index)
            hidden = self._post(layer, attend, query, keys, values, mask, hidden)
        return self.lm_head(self.text.norm(hidden)[:, -1])
