"""``DecodeForward``: the decode step layer by layer, split around the KV write.

Uncompiled it must compute exactly what the model's own forward computes; compiled, each of
its two parts must be traced once per shape and reused by every layer (that is what keeps
compiling a 40-layer model to seconds), with the same logits up to float rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from inference.engine.attention import GROUPED_ATTENTION, register_grouped_attention
from inference.engine.decode_forward import DecodeForward
from inference.engine.kv_cache import SlotKVCache

BATCH, KV_LEN = 3, 48
WRITE_POSITIONS = (5, 17, 40)


def _model(tiny_random_model_dir: Path, layers: int, dtype: torch.dtype):
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    config = json.loads((tiny_random_model_dir / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = layers
    torch.manual_seed(0)
    model = Glm4vForConditionalGeneration(Glm4vConfig(**config)).to(dtype).eval()
    for parameter in model.parameters():  # wide weights: a wrong term changes the logits a lot
        parameter.data.normal_(0, 0.3)
    return model


def _cache(model, dtype: torch.dtype) -> SlotKVCache:
    """A KV cache with the same random contents at every call (stale data in every slot)."""
    text = model.config.get_text_config()
    cache = SlotKVCache(
        num_layers=text.num_hidden_layers,
        num_slots=BATCH,
        kv_heads=text.num_key_value_heads,
        max_len=64,
        head_dim=text.hidden_size // text.num_attention_heads,
        dtype=dtype,
        device=torch.device("cpu"),
    )
    generator = torch.Generator().manual_seed(1)
    cache.keys.normal_(generator=generator)
    cache.values.normal_(generator=generator)
    return cache


def _inputs():
    positions = torch.tensor(WRITE_POSITIONS)
    ids = torch.tensor([[3], [70], [250]])
    rope = (positions + torch.tensor([0, 7, 2])).view(1, BATCH, 1).expand(3, -1, -1)
    mask = (torch.arange(KV_LEN).view(1, KV_LEN) <= positions.view(BATCH, 1)).view(
        BATCH, 1, 1, KV_LEN
    )
    return positions, ids, rope, mask


def _view(cache, positions):
    return cache.batch_view(torch.arange(BATCH), positions, BATCH, KV_LEN)


@pytest.mark.parametrize("attention", [GROUPED_ATTENTION, "sdpa"])
def test_uncompiled_equals_the_models_own_forward_exactly(tiny_random_model_dir, attention):
    register_grouped_attention()
    model = _model(tiny_random_model_dir, layers=3, dtype=torch.float64)
    positions, ids, rope, mask = _inputs()
    cache, ours_cache = _cache(model, torch.float64), _cache(model, torch.float64)

    text_config = model.config.get_text_config()
    previous = text_config._attn_implementation_internal
    text_config._attn_implementation_internal = attention
    try:
        with torch.inference_mode():
            out = model.model.language_model(
                input_ids=ids, position_ids=rope, attention_mask=mask,
                cache=_view(cache, positions), use_cache=True,
            )  # fmt: skip
            theirs = model.lm_head(out.last_hidden_state[:, -1])
    finally:
        text_config._attn_implementation_internal = previous
    with torch.inference_mode():
        ours = DecodeForward(model, attention)(ids, rope, mask, _view(ours_cache, positions))
    assert torch.equal(ours, theirs)
    # The same keys/values were written, at the same places.
    assert torch.equal(ours_cache.keys, cache.keys) and torch.equal(ours_cache.values, cache.values)


@pytest.mark.slow
def test_compiled_parts_are_traced_once_and_shared_by_every_layer(tiny_random_model_dir):
    """Inductor on the CPU (the GPU's backend too): one graph per part for four layers, and
    the logits of the uncompiled step to float32 rounding."""
    from torch._dynamo.utils import counters

    register_grouped_attention()
    torch._dynamo.reset()
    counters.clear()
    model = _model(tiny_random_model_dir, layers=4, dtype=torch.float32)
    positions, ids, rope, mask = _inputs()
    cache, plain_cache = _cache(model, torch.float32), _cache(model, torch.float32)
    compiled = DecodeForward(
        model, GROUPED_ATTENTION, compile_options={"backend": "inductor", "dynamic": False}
    )
    with torch.inference_mode():
        plain = DecodeForward(model, GROUPED_ATTENTION)(
            ids, rope, mask, _view(plain_cache, positions)
        )
        for _ in range(2):  # the second call must reuse what the first compiled
            fast = compiled(ids, rope, mask, _view(cache, positions))
    assert counters["stats"]["unique_graphs"] == 2
    assert not counters["graph_break"]
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)
    assert fast.argmax(-1).tolist() == plain.argmax(-1).tolist()
    torch.testing.assert_close(cache.keys, plain_cache.keys, rtol=1e-5, atol=1e-5)
