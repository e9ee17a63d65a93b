"""The fixed-shape decode step: buckets, static buffers, padding, launches ahead of their
results, in-graph sampling and compiled layers.

On CPU the decoder runs each shape's step closure eagerly on the same static buffers that a
GPU captures into CUDA graphs, so these tests exercise the captured code itself; the one
GPU-only part is ``torch.cuda.graph`` around it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from inference.engine.decoder import (
    BucketedDecoder,
    DecodeRows,
    batch_buckets,
    kv_buckets,
    pick_bucket,
)
from inference.engine.sampling import RowSampler, sample
from tests.inference.conftest import prepared_prompt

QUESTIONS = ("What is in the image?", "天气怎么样？", "Describe the picture.")
IMAGE = (56, 84)  # the second row's prompt has an image (shifted decode positions)


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
    prompt = prepared_prompt(runner, question, image=image)
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


def _rows(runner, cache, n=3):
    """Slots 0..n-1 prefilled with different prompts (the second with an image); each row's
    prefill job and greedy next token."""
    rows = []
    for slot, question in enumerate(QUESTIONS[:n]):
        job, logits = _prefill(runner, cache, slot, question, image=IMAGE if slot == 1 else None)
        rows.append((job, int(logits.argmax())))
    return rows


def _decoder(runner, cache, batch_sizes, **kwargs):
    kwargs.setdefault("kv_lengths", kv_buckets(cache.max_len, (64,)))
    return BucketedDecoder(runner, cache, batch_sizes=batch_sizes, **kwargs)


def _positions(rows, ahead=0):
    return [job.length + ahead for job, _ in rows]


def _deltas(rows):
    return [job.rope_delta for job, _ in rows]


def _decode(decoder, rows):
    return decoder.decode([token for _, token in rows], _positions(rows), _deltas(rows))


def _kv(cache):
    return [t.clone() for t in (*cache.keys, *cache.values)]


def test_padded_rows_never_leak_into_outputs_or_other_slots(tiny_random_runner):
    runner = tiny_random_runner
    cache = runner.allocate_cache(num_slots=4, max_len=128)
    rows = _rows(runner, cache)
    for buffer in (*cache.keys, *cache.values):
        buffer[3] = 7.0  # slot 3 belongs to nobody in this batch: it must stay as it is
    before = _kv(cache)
    decoder = _decoder(runner, cache, (1, 2, 4))
    logits = _decode(decoder, rows)
    assert decoder.runs == {(4, 64): 1}  # three rows padded to the bucket of four
    assert logits.shape == (3, runner.vocab_size) and logits.dtype == torch.float32
    after = _kv(cache)
    for old, new in zip(before, after, strict=True):
        assert torch.equal(new[3], old[3])
        # Each real row wrote exactly its own next position; the padded row the scratch slot.
        changed = (new != old).any(dim=(1, 3))  # [slot, position]
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
            image=IMAGE if slot == 1 else None,
            extra_token=token,
        )
        torch.testing.assert_close(logits[slot], reference.float(), rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_attention_variants_and_buckets_give_the_same_logits(tiny_random_runner):
    runner = tiny_random_runner
    results = []
    for batch_sizes, attention in (((3,), "grouped"), ((4,), "sdpa"), ((8,), "flex")):
        cache = runner.allocate_cache(num_slots=8, max_len=128)
        rows = _rows(runner, cache)
        decoder = _decoder(runner, cache, batch_sizes, attention=attention)
        results.append(_decode(decoder, rows))
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=0, atol=1e-9)


def test_static_buffers_are_reused_and_the_step_never_syncs(tiny_random_runner, monkeypatch):
    """What CUDA graph capture needs: fixed input addresses and no host synchronisation
    (``.item()``, ``.tolist()`` or a tensor in a Python ``if``) inside the step, the
    sampling variant included."""
    runner = tiny_random_runner
    cache = runner.allocate_cache(num_slots=4, max_len=128)
    decoder = _decoder(runner, cache, (1, 2, 4))
    inputs = decoder.inputs
    addresses = [t.data_ptr() for t in (inputs.ints, inputs.floats, inputs.next_ids)]
    rows = _rows(runner, cache)

    def host_sync(*args, **kwargs):
        raise AssertionError("host synchronisation inside the decode step")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
            patch.setattr(torch.Tensor, name, host_sync)
        assert decoder.warmup() == len(decoder.shapes) == 6
        sampled = DecodeRows.fresh([t for _, t in rows], _positions(rows), _deltas(rows))
        sampled.sampling = [(1.0, 0.9, 0.5)] * len(rows)
        launch = decoder.launch(sampled)
    # Each shape ran twice in the warm-up: greedy, then its sampling variant.
    assert decoder.runs == {(b, k): 2 for b in (1, 2, 4) for k in (64, 128)} | {(4, 64): 3}
    assert len(decoder.collect(launch)) == 3
    _decode(decoder, rows)
    _decode(decoder, rows[:1])
    assert [t.data_ptr() for t in (inputs.ints, inputs.floats, inputs.next_ids)] == addresses
    assert not decoder.use_graphs  # CPU: the same closures, run eagerly


def test_a_row_fed_from_the_previous_launch_gets_its_token_on_the_device(tiny_random_runner):
    runner = tiny_random_runner
    cache = runner.allocate_cache(num_slots=4, max_len=128)
    rows = _rows(runner, cache)
    decoder = _decoder(runner, cache, (1, 2, 4))
    first = decoder.launch(DecodeRows.fresh([t for _, t in rows], _positions(rows), _deltas(rows)))
    # Row 0 feeds the first launch's row 1, row 2 its row 0; row 1 a token from the host.
    # The host ids of rows 0 and 2 are junk that must not be used.
    host_token = 7
    second = decoder.launch(
        DecodeRows(
            host_ids=[0, host_token, 0],
            sources=[1, -1, 0],
            positions=_positions(rows, ahead=1),
            rope_deltas=_deltas(rows),
        )
    )
    firsts = decoder.collect(first)
    seconds = decoder.collect(second)
    written = _kv(cache)
    assert firsts[0] != firsts[1] and 0 not in firsts[:2]  # so a wrong source would show

    fed = [firsts[1], host_token, firsts[0]]
    expected = decoder.decode(fed, _positions(rows, ahead=1), _deltas(rows))
    assert seconds == expected.argmax(dim=-1).tolist()
    # Rewriting the same positions with the host-fed tokens changes nothing.
    for old, new in zip(written, _kv(cache), strict=True):
        assert torch.equal(new, old)


def test_two_launches_in_flight_give_the_tokens_of_synchronous_steps(tiny_random_runner):
    runner = tiny_random_runner
    cache = runner.allocate_cache(num_slots=4, max_len=128)
    rows = _rows(runner, cache)
    decoder = _decoder(runner, cache, (1, 2, 4))
    first = decoder.launch(DecodeRows.fresh([t for _, t in rows], _positions(rows), _deltas(rows)))
    second = decoder.launch(
        DecodeRows(
            host_ids=[0, 0, 0],
            sources=[0, 1, 2],
            positions=_positions(rows, ahead=1),
            rope_deltas=_deltas(rows),
        )
    )
    launched = [decoder.collect(first), decoder.collect(second)]

    sync_cache = runner.allocate_cache(num_slots=4, max_len=128)
    sync_rows = _rows(runner, sync_cache)
    sync = _decoder(runner, sync_cache, (1, 2, 4))
    step1 = _decode(sync, sync_rows).argmax(dim=-1).tolist()
    step2 = sync.decode(step1, _positions(rows, ahead=1), _deltas(rows)).argmax(dim=-1).tolist()
    assert launched == [step1, step2]
    for mine, theirs in zip(_kv(cache), _kv(sync_cache), strict=True):
        torch.testing.assert_close(mine[:3], theirs[:3], rtol=0, atol=1e-12)


def _samplers():
    """A sampled row, a greedy row and a sharper sampled row; seeded."""
    return [
        RowSampler(1.0, 0.9, torch.Generator().manual_seed(1)),
        RowSampler(0.0, 1.0, None),
        RowSampler(0.7, 1.0, torch.Generator().manual_seed(2)),
    ]


def test_sampling_in_the_step_reproduces_sample_for_the_same_draws(tiny_random_runner):
    runner = tiny_random_runner
    cache = runner.allocate_cache(num_slots=4, max_len=128)
    rows = _rows(runner, cache)
    decoder = _decoder(runner, cache, (1, 2, 4))  # three rows: one padded row too
    logits = _decode(decoder, rows)
    in_graph, on_host = _samplers(), _samplers()
    launched, sampled = [], []
    for _ in range(20):  # each launch rewrites the same positions with the same tokens
        step = DecodeRows.fresh([t for _, t in rows], _positions(rows), _deltas(rows))
        step.sampling = [(s.temperature, s.top_p, s.draw()) for s in in_graph]
        launched.append(decoder.collect(decoder.launch(step)))
        sampled.append(sample(logits, on_host))
    assert launched == sampled
    assert {tokens[1] for tokens in launched} == {int(logits[1].argmax())}  # greedy row
    assert len({tokens[0] for tokens in launched}) > 1  # the draws really sampled


def _counting_backend(calls):
    """A torch.compile backend that runs the traced graph as is and counts its calls."""

    def backend(graph_module, example_inputs):
        def run(*args):
            calls.append(len(args))
            return graph_module(*args)

        return run

    return backend


def test_compiled_layers_give_the_same_logits_and_eager_buckets_stay_eager(tiny_random_runner):
    """Compiled through dynamo with a backend that runs the traced graph (no C++ compiler
    needed); inductor itself is tested below."""
    runner = tiny_random_runner
    plain_cache = runner.allocate_cache(num_slots=4, max_len=128)
    plain = _decoder(runner, plain_cache, (1, 2, 4))
    plain_rows = _rows(runner, plain_cache)
    calls: list[int] = []
    cache = runner.allocate_cache(num_slots=4, max_len=128)
    decoder = _decoder(
        runner,
        cache,
        (1, 2, 4),
        compile_layers=True,
        compile_backend=_counting_backend(calls),
        eager_batch_sizes=(2,),
    )
    rows = _rows(runner, cache)
    assert decoder.compiled_batch_sizes == (1, 4)

    torch.testing.assert_close(_decode(decoder, rows), _decode(plain, plain_rows), rtol=0, atol=0)
    assert len(calls) == runner.num_layers  # the bucket of four ran the compiled layer

    torch.testing.assert_close(
        _decode(decoder, rows[:2]), _decode(plain, plain_rows[:2]), rtol=0, atol=0
    )
    assert len(calls) == runner.num_layers  # the bucket of two did not
    assert decoder.compile_error is None


@pytest.mark.slow
def test_inductor_compiled_layers_give_the_same_logits(tiny_random_runner):
    runner = tiny_random_runner
    plain_cache = runner.allocate_cache(num_slots=4, max_len=64)
    expected = _decode(_decoder(runner, plain_cache, (4,)), _rows(runner, plain_cache))
    cache = runner.allocate_cache(num_slots=4, max_len=64)
    decoder = _decoder(runner, cache, (4,), compile_layers=True, capture_sampling=False)
    decoder.warmup()
    assert decoder.compile_error is None and decoder.compiled_batch_sizes == (4,)
    torch.testing.assert_close(_decode(decoder, _rows(runner, cache)), expected, rtol=0, atol=1e-5)


def test_a_compiler_failure_at_warmup_leaves_every_bucket_eager(tiny_random_runner):
    runner = tiny_random_runner

    def failing_backend(graph_module, example_inputs):
        raise RuntimeError("no C++ compiler on this host")

    plain_cache = runner.allocate_cache(num_slots=4, max_len=128)
    expected = _decode(_decoder(runner, plain_cache, (1, 2, 4)), _rows(runner, plain_cache))
    cache = runner.allocate_cache(num_slots=4, max_len=128)
    decoder = _decoder(
        runner, cache, (1, 2, 4), compile_layers=True, compile_backend=failing_backend
    )
    assert decoder.compiled_batch_sizes == (1, 2, 4)
    assert decoder.warmup() == 6
    assert "no C++ compiler on this host" in decoder.compile_error
    assert decoder.compiled_batch_sizes == ()
    torch.testing.assert_close(_decode(decoder, _rows(runner, cache)), expected, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="compiled flex attention needs CUDA here: inductor's CPU flex template in torch "
    "2.13 emits C++ that does not compile (`cur_qSplitSize3` undeclared) for this layer",
)
def test_inductor_compiled_flex_attention_gives_the_same_logits(tiny_model_dir):
    """float32 on the trained tiny model (inductor's flex kernels take no float64)."""
    from inference.engine.runner import ModelRunner

    runner = ModelRunner.from_spec({"path": str(tiny_model_dir), "dtype": "float32"})
    plain_cache = runner.allocate_cache(num_slots=4, max_len=128)
    plain = _decoder(runner, plain_cache, (1, 4), attention="flex")
    expected = _decode(plain, _rows(runner, plain_cache))
    cache = runner.allocate_cache(num_slots=4, max_len=128)
    decoder = _decoder(runner, cache, (1, 4), attention="flex", compile_layers=True)
    decoder.warmup()
    assert decoder.compile_error is None
    logits = _decode(decoder, _rows(runner, cache))
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)
    assert logits.argmax(dim=-1).tolist() == expected.argmax(dim=-1).tolist()
