"""The fixed-shape decode step: buckets, static buffers, padding, grouped attention.

On CPU the decoder runs each shape's step closure eagerly on the same static buffers that a
GPU captures into CUDA graphs, so these tests exercise the captured code itself; the one
GPU-only part is ``torch.cuda.graph`` around it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from inference.engine.attention import GROUPED_ATTENTION, grouped_attention
from inference.engine.decoder import BucketedDecoder, batch_buckets, kv_buckets, pick_bucket
from tests.inference.conftest import chat_request, image_bytes

QUESTIONS = ("What is in the image?", "天气怎么样？", "Describe the picture.")


def test_bucket_lists_and_choice():
    assert batch_buckets(8) == (1, 2, 4, 8)
    assert batch_buckets(6) == (1, 2, 4, 6)  # the limit itself is always a bucket
    assert batch_buckets(8, (3, 5, 100)) == (3, 5, 8)
    assert kv_buckets(4096) == (512, 1024, 2048, 4096)
    assert kv_buckets(300) == (300,)
    assert kv_buckets(256, (40, 100, 999)) == (40, 100, 256)
    assert [pick_bucket((1, 2, 4, 8), n) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    with pytest.raises(ValueError):
        pick_bucket((1, 2, 4), 5)


def _prefill(runner, cache, slot, question, *, image=None, extra_token=None):
    """Prefill a one-turn prompt (optionally plus one more token) into ``slot``."""
    images = {"i": image_bytes(*image, seed=3)} if image else {}
    request = chat_request("x", question, images={"i": image} if image else None)
    processed = runner.process_images(request.messages, images, scope="t")
    prompt = runner.build_prompt(request.messages, processed, thinking=False)
    if extra_token is not None:
        prompt = dataclasses.replace(
            prompt,
            input_ids=torch.cat([prompt.input_ids, torch.tensor([[extra_token]])], dim=1),
            mm_token_type_ids=torch.cat([prompt.mm_token_type_ids, torch.zeros(1, 1)], dim=1).to(
                torch.int
            ),
        )
    [encoded] = runner.encode_images([prompt], None)
    job = runner.begin_prefill(prompt, encoded)
    logits = runner.prefill_chunk(cache, job, slot, job.length)
    return job, logits


def _three_rows(runner, cache):
    """Slots 0..2 prefilled with different prompts (one with an image); their next tokens."""
    rows = []
    for slot, question in enumerate(QUESTIONS):
        job, logits = _prefill(runner, cache, slot, question, image=(56, 84) if slot == 1 else None)
        rows.append((job, int(logits.argmax())))
    return rows


def _decoder(runner, cache, batch_sizes, **kwargs):
    return BucketedDecoder(
        runner,
        cache,
        batch_sizes=batch_sizes,
        kv_lengths=kv_buckets(cache.max_len, (64,)),
        attention=kwargs.pop("attention", GROUPED_ATTENTION),
        **kwargs,
    )


def _decode(decoder, rows):
    return decoder.decode(
        [token for _, token in rows],
        [job.length for job, _ in rows],
        [job.rope_delta for job, _ in rows],
    )


def test_padded_rows_never_leak_into_outputs_or_other_slots(tiny_random_runner):
    runner = tiny_random_runner
    cache = runner.allocate_cache(num_slots=4, max_len=128)
    rows = _three_rows(runner, cache)
    cache.keys[:, 3] = 7.0  # slot 3 belongs to nobody in this batch: it must stay as it is
    before = cache.keys.clone()
    decoder = _decoder(runner, cache, (1, 2, 4))
    logits = _decode(decoder, rows)
    assert decoder.runs == {(4, 64): 1}  # three rows padded to the bucket of four
    assert logits.shape == (3, runner.vocab_size) and logits.dtype == torch.float32
    assert torch.equal(cache.keys[:, 3], before[:, 3])
    # Each real row wrote exactly its own next position; the padded row wrote the scratch slot.
    changed = (cache.keys != before).any(dim=(0, 2, 4))  # [slot, position]
    for slot, (job, _) in enumerate(rows):
        assert changed[slot].nonzero().view(-1).tolist() == [job.length]
    assert changed[cache.scratch].nonzero().view(-1).tolist() == [0]

    # Same logits as the prompt + token prefilled alone (what generate's next step computes).
    for slot, (_, token) in enumerate(rows):
        reference_cache = runner.allocate_cache(num_slots=1, max_len=128)
        _, reference = _prefill(
            runner,
            reference_cache,
            0,
            QUESTIONS[slot],
            image=(56, 84) if slot == 1 else None,
            extra_token=token,
        )
        torch.testing.assert_close(logits[slot], reference.float(), rtol=0, atol=1e-5)


def test_decode_uses_grouped_attention_and_leaves_the_model_as_it_was(
    tiny_random_runner, monkeypatch
):
    from transformers import AttentionInterface

    shapes = []

    def spy(module, query, key, value, mask, **kwargs):
        shapes.append((tuple(query.shape), tuple(key.shape)))
        return grouped_attention(module, query, key, value, mask, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, GROUPED_ATTENTION, spy)
    runner = tiny_random_runner
    cache = runner.allocate_cache(num_slots=4, max_len=128)
    rows = _three_rows(runner, cache)
    assert not shapes  # prefill keeps the model's own attention
    _decode(_decoder(runner, cache, (4,)), rows)
    heads, kv_heads = 4, 2  # the tiny model: the KV heads are not expanded
    assert shapes == [((4, heads, 1, 16), (4, kv_heads, 64, 16))] * runner.num_layers
    assert runner.model.config.get_text_config()._attn_implementation == "sdpa"


def test_bucketed_equals_exact_batch_and_model_attention(tiny_random_runner):
    runner = tiny_random_runner
    results = []
    for batch_sizes, attention in (((3,), GROUPED_ATTENTION), ((4,), None), ((8,), None)):
        cache = runner.allocate_cache(num_slots=8, max_len=128)
        rows = _three_rows(runner, cache)
        results.append(_decode(_decoder(runner, cache, batch_sizes, attention=attention), rows))
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=0, atol=1e-9)


def test_static_buffers_are_reused_and_the_step_never_syncs(tiny_random_runner, monkeypatch):
    """What CUDA graph capture needs: fixed input addresses and no host synchronisation
    (``.item()``, ``.tolist()`` or a tensor in a Python ``if``) inside the step."""
    runner = tiny_random_runner
    cache = runner.allocate_cache(num_slots=4, max_len=128)
    decoder = _decoder(runner, cache, (1, 2, 4))
    table = decoder.inputs.table.data_ptr()

    def host_sync(*args, **kwargs):
        raise AssertionError("host synchronisation inside the decode step")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
            patch.setattr(torch.Tensor, name, host_sync)
        assert decoder.warmup() == len(decoder.shapes) == 6
    assert set(decoder.runs) == {(b, k) for b in (1, 2, 4) for k in (64, 128)}
    rows = _three_rows(runner, cache)
    _decode(decoder, rows)
    _decode(decoder, rows[:1])
    assert decoder.inputs.table.data_ptr() == table
    assert not decoder.use_graphs  # CPU: the same closures, run eagerly


def test_compiled_bucket_gives_the_same_logits(tiny_random_runner):
    """``compile_batch_sizes`` goes through torch.compile (the dynamo 'eager' backend here:
    no C compiler needed; inductor is the GPU default and must be measured per bucket)."""
    runner = tiny_random_runner
    plain_cache = runner.allocate_cache(num_slots=2, max_len=128)
    plain = _decode(_decoder(runner, plain_cache, (1, 2)), _three_rows_of(runner, plain_cache, 2))
    cache = runner.allocate_cache(num_slots=2, max_len=128)
    decoder = _decoder(runner, cache, (1, 2), compile_batch_sizes=(2,), compile_backend="eager")
    compiled = _decode(decoder, _three_rows_of(runner, cache, 2))
    torch.testing.assert_close(compiled, plain, rtol=0, atol=1e-9)


def _three_rows_of(runner, cache, n):
    rows = []
    for slot, question in enumerate(QUESTIONS[:n]):
        job, logits = _prefill(runner, cache, slot, question)
        rows.append((job, int(logits.argmax())))
    return rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("queries", [1, 5])
def test_grouped_attention_matches_sdpa(dtype, queries):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Module:
        num_key_value_groups = 4
        is_causal = True
        training = False

    torch.manual_seed(0)
    batch, heads, kv_heads, keys, dim = 3, 8, 2, 17, 16
    q = torch.randn(batch, heads, queries, dim, dtype=dtype)
    k = torch.randn(batch, kv_heads, keys, dim, dtype=dtype)
    v = torch.randn(batch, kv_heads, keys, dim, dtype=dtype)
    lengths = torch.tensor([17, 9, 6]).view(batch, 1, 1)
    query_pos = lengths - queries + torch.arange(queries).view(1, queries, 1)
    visible = (torch.arange(keys).view(1, 1, keys) <= query_pos).view(batch, 1, queries, keys)
    additive = torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
    tolerance = {"rtol": 0, "atol": 1e-5 if dtype == torch.float32 else 1e-12}
    for mask in (visible, additive):
        ours, _ = grouped_attention(Module(), q, k, v, mask, scaling=dim**-0.5)
        theirs, _ = sdpa_attention_forward(Module(), q, k, v, mask, scaling=dim**-0.5)
        assert ours.shape == (batch, queries, heads, dim)
        torch.testing.assert_close(ours, theirs, **tolerance)
    # No mask: causal, the last `queries` positions (a prefill when queries == keys).
    full = k[:, :, :queries], v[:, :, :queries]
    ours, _ = grouped_attention(Module(), q, *full, None, scaling=dim**-0.5)
    theirs, _ = sdpa_attention_forward(Module(), q, *full, None, scaling=dim**-0.5)
    torch.testing.assert_close(ours, theirs, **tolerance)
