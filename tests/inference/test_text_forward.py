"""text_forward: the packed prefill and the decode layer compute what the model computes.

The reference is always the model's own forward (``Glm4vForConditionalGeneration`` with a
``DynamicCache``) on each prompt alone, on the float64 random wide-init model, so anything
beyond rounding (a wrong position, mask, slot, chunk boundary or head grouping) shows.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from inference.engine.text_forward import (
    DECODE_ATTENTION,
    PackedChunk,
    TextWeights,
    fuse_linears,
    make_decode_layer,
    prefill_packed,
)
from tests.inference.conftest import parameter_storage_bytes, prepared_prompt

# (question, image size or None): one prompt with an image (M-RoPE positions, rope delta).
PROMPTS = (
    ("What is in the image?", (56, 84)),
    ("天气怎么样？", None),
    ("Describe the picture.", None),
)
EXACT = {"rtol": 0, "atol": 1e-10}


def _prompts(runner):
    return [prepared_prompt(runner, question, image=image) for question, image in PROMPTS]


def _jobs(runner, prompts):
    encoded = runner.encode_images(prompts, None)
    return [runner.begin_prefill(p, e) for p, e in zip(prompts, encoded, strict=True)]


def _model_alone(runner, prompt, next_token=None):
    """The model's last-position logits and its cache for ``prompt`` (plus ``next_token``
    fed as one more step with the cache, as ``generate`` does)."""
    runner.model.model.rope_deltas = None  # the model keeps this between calls
    cache = DynamicCache(config=runner.model.config)
    with torch.inference_mode():
        out = runner.model(**prompt.model_inputs(), cache=cache)
        if next_token is not None:
            out = runner.model(input_ids=torch.tensor([[next_token]]), cache=cache)
    return out.logits[0, -1], cache


def _untouched(cache, slot):
    return all(bool(t[slot].eq(0).all()) for t in (*cache.keys, *cache.values))


def test_packed_prefill_equals_the_model_on_each_prompt_alone(tiny_random_runner):
    runner = tiny_random_runner
    prompts = _prompts(runner)
    jobs = _jobs(runner, prompts)
    cache = runner.allocate_cache(num_slots=4, max_len=64)
    slot_of = {0: 3, 1: 0, 2: 1}  # slot 2 belongs to nobody
    half, five = jobs[0].length // 2, 5
    # (prompt, start, end) per packed call: fresh and continuing chunks of several prompts,
    # complete and incomplete ones side by side.
    calls = [
        [(0, 0, half), (1, 0, jobs[1].length)],
        [(0, half, jobs[0].length), (2, 0, five)],
        [(2, five, jobs[2].length)],
    ]
    logits = {}
    for call in calls:
        chunks = [PackedChunk(slot_of[i], start, end) for i, start, end in call]
        embeds = torch.cat([jobs[i].embeds[start:end] for i, start, end in call])
        positions = torch.cat([jobs[i].positions[:, start:end] for i, start, end in call], dim=1)
        last_rows, completed, offset = [], [], 0
        for i, start, end in call:
            offset += end - start
            if end == jobs[i].length:
                last_rows.append(offset - 1)
                completed.append(i)
        out = prefill_packed(
            runner.text_weights,
            cache.keys,
            cache.values,
            embeds,
            positions,
            chunks,
            last_rows=last_rows,
        )
        assert out.shape == (len(completed), runner.vocab_size)
        logits.update(zip(completed, out, strict=True))
    assert sorted(logits) == [0, 1, 2]

    for i, prompt in enumerate(prompts):
        expected, reference = _model_alone(runner, prompt)
        torch.testing.assert_close(logits[i], expected, **EXACT)
        slot, length = slot_of[i], jobs[i].length
        for layer in range(runner.num_layers):
            ours = cache.keys[layer][slot], cache.values[layer][slot]
            theirs = reference.layers[layer].keys[0], reference.layers[layer].values[0]
            for mine, model in zip(ours, theirs, strict=True):
                torch.testing.assert_close(mine[:, :length], model, **EXACT)
                assert mine[:, length:].eq(0).all()  # nothing written past the prompt
    assert _untouched(cache, 2) and _untouched(cache, cache.scratch)


def _decode_step(weights, layer, cache, tokens, write_pos, rope_pos, write_slot, kv_len):
    """One decode step through ``layer``, shaped as the decoder runs it."""
    batch = len(tokens)
    write_pos = torch.tensor(write_pos)
    write_slot = torch.tensor(write_slot)
    with torch.inference_mode():
        hidden = weights.embed(torch.tensor(tokens))
        rope = torch.tensor(rope_pos).view(1, batch, 1).expand(3, -1, -1)
        cos, sin = weights.rotary(hidden[:, None], position_ids=rope)
        visible = torch.arange(kv_len).view(1, kv_len) <= write_pos.view(batch, 1)
        for index, w in enumerate(weights.layers):
            hidden = layer(
                hidden,
                cos,
                sin,
                visible,
                write_slot,
                write_pos,
                cache.keys[index],
                cache.values[index],
                *w.args(),
            )
        return weights.logits(hidden)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("attention", DECODE_ATTENTION)
def test_decode_layer_equals_the_models_one_token_step(tiny_random_runner, attention):
    runner = tiny_random_runner
    prompts = _prompts(runner)
    jobs = _jobs(runner, prompts)
    cache = runner.allocate_cache(num_slots=4, max_len=64)
    tokens = []
    for slot, job in enumerate(jobs):
        tokens.append(int(runner.prefill_chunk(cache, job, slot, job.length).argmax()))
    for buffer in (*cache.keys, *cache.values):
        buffer[3] = 7.0  # slot 3 is nobody's in this batch: the padded row must not touch it
    lengths = [job.length for job in jobs]
    # Three rows in slots 0..2 and one padded row (token 0 at position 0, scratch slot).
    logits = _decode_step(
        runner.text_weights,
        make_decode_layer(runner.text_weights, attention),
        cache,
        tokens=[*tokens, 0],
        write_pos=[*lengths, 0],
        rope_pos=[*(job.length + job.rope_delta for job in jobs), 0],
        write_slot=[0, 1, 2, cache.scratch],
        kv_len=64,
    )
    assert jobs[0].rope_delta != 0  # the image prompt's decode positions are shifted
    for i, prompt in enumerate(prompts):
        expected, reference = _model_alone(runner, prompt, next_token=tokens[i])
        torch.testing.assert_close(logits[i], expected, **EXACT)
        for layer in range(runner.num_layers):
            written = cache.keys[layer][i, :, : lengths[i] + 1]
            torch.testing.assert_close(written, reference.layers[layer].keys[0], **EXACT)
            written = cache.values[layer][i, :, : lengths[i] + 1]
            torch.testing.assert_close(written, reference.layers[layer].values[0], **EXACT)
    assert all(bool(t[3].eq(7.0).all()) for t in (*cache.keys, *cache.values))


def test_decode_layer_rejects_an_unknown_attention(tiny_random_runner):
    with pytest.raises(ValueError, match="grouped"):
        make_decode_layer(tiny_random_runner.text_weights, "flash")


def test_fusing_qkv_keeps_the_models_output_and_adds_no_memory(tiny_model_dir):
    from transformers import Glm4vForConditionalGeneration

    model = Glm4vForConditionalGeneration.from_pretrained(
        tiny_model_dir, dtype=torch.float64, local_files_only=True
    ).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 8]])
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    memory = parameter_storage_bytes(model)

    weights = TextWeights(model)

    with torch.inference_mode():
        after = model(input_ids=ids).logits
    assert torch.equal(after, before)
    assert parameter_storage_bytes(model) == memory
    for layer, fused in zip(model.model.language_model.layers, weights.layers, strict=True):
        projections = (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
        assert torch.equal(torch.cat([p.weight for p in projections]), fused.qkv)
        assert torch.equal(torch.cat([p.bias for p in projections]), fused.qkv_bias)
        for projection in projections:  # views of the fused tensors, not copies
            assert projection.weight.untyped_storage().data_ptr() == fused.qkv.data_ptr()
            assert projection.bias.untyped_storage().data_ptr() == fused.qkv_bias.data_ptr()


def test_fusing_refuses_projections_where_only_some_have_a_bias():
    linears = [torch.nn.Linear(4, 2), torch.nn.Linear(4, 2, bias=False)]
    with pytest.raises(ValueError, match="bias"):
        fuse_linears(linears)


def test_flex_decode_reads_each_row_up_to_its_own_length_across_blocks():
    """Rows of one batch end inside the first block, on a block edge, one past it and at
    the bucket's end (three 128-position blocks, the last partial): each must equal
    softmax attention over exactly its own positions, grouped heads included."""
    from inference.engine.text_forward import FLEX_KV_BLOCK, _flex_decode

    torch.manual_seed(0)
    batch, heads, kv_heads, dim, kv_len = 5, 8, 2, 16, 300
    query = torch.randn(batch, heads, 1, dim, dtype=torch.float64)
    keys = torch.randn(batch, kv_heads, kv_len, dim, dtype=torch.float64)
    values = torch.randn(batch, kv_heads, kv_len, dim, dtype=torch.float64)
    lengths = torch.tensor([1, FLEX_KV_BLOCK - 1, FLEX_KV_BLOCK, FLEX_KV_BLOCK + 1, kv_len])
    visible = torch.arange(kv_len)[None] < lengths[:, None]
    out = _flex_decode(query, keys, values, visible, dim**-0.5)
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = (grouped @ keys.transpose(-1, -2)) * dim**-0.5
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    expected = (scores.softmax(-1) @ values).reshape(batch, heads, 1, dim)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
