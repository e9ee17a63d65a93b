"""ModelRunner: packed prefill of several prompts' chunks, the vision work of several
prompts as one pass, and the compiled prefill."""

from __future__ import annotations

import pytest
import torch

from inference.engine.image_cache import ImageEmbeddingCache
from tests.inference.conftest import chat_request, image_bytes, prepared_prompt


def _jobs(runner, *questions):
    prompts = [prepared_prompt(runner, question) for question in questions]
    encoded = runner.encode_images(prompts, None)
    return [runner.begin_prefill(p, e) for p, e in zip(prompts, encoded, strict=True)]


def _one_piece(runner, question):
    cache = runner.allocate_cache(num_slots=1, max_len=64)
    [job] = _jobs(runner, question)
    return runner.prefill_chunk(cache, job, 0, job.length)


def test_a_packed_prefill_returns_logits_for_the_prompts_it_completes(tiny_random_runner):
    runner = tiny_random_runner
    questions = ("天气怎么样？", "Describe the picture.")
    first, second = _jobs(runner, *questions)
    cache = runner.allocate_cache(num_slots=2, max_len=64)
    out = runner.prefill(cache, [(first, 0, 7), (second, 1, second.length)])
    assert out[0] is None and (first.done, second.done) == (7, second.length)
    [last] = runner.prefill(cache, [(first, 0, first.length)])
    assert first.done == first.length
    for logits, question in ((last, questions[0]), (out[1], questions[1])):
        assert logits.shape == (runner.vocab_size,) and logits.dtype == torch.float32
        torch.testing.assert_close(logits, _one_piece(runner, question), rtol=0, atol=1e-6)


def test_a_packed_prefill_refuses_chunks_it_cannot_place(tiny_random_runner):
    runner = tiny_random_runner
    [job] = _jobs(runner, "天气怎么样？")
    cache = runner.allocate_cache(num_slots=2, max_len=64)
    with pytest.raises(ValueError, match="twice"):
        runner.prefill(cache, [(job, 0, 3), (job, 1, 5)])
    with pytest.raises(ValueError, match="outside"):
        runner.prefill(cache, [(job, 0, job.length + 1)])
    runner.prefill(cache, [(job, 0, 5)])
    with pytest.raises(ValueError, match="outside"):
        runner.prefill(cache, [(job, 0, 5)])  # nothing new: 5..5
    assert job.done == 5


def _image_prompts(runner):
    """Prompts over images a, b, c: [a], [a, b], [c] and one without an image."""
    sizes = {"a": (56, 84), "b": (28, 56), "c": (84, 28)}
    data = {sha: image_bytes(*size, seed=n) for n, (sha, size) in enumerate(sizes.items())}
    prompts = []
    for shas in (["a"], ["a", "b"], ["c"], []):
        request = chat_request("r", "What is in the image?", images={s: sizes[s] for s in shas})
        processed = runner.process_images(request.messages, data, scope="tests")
        prompts.append(runner.build_prompt(request.messages, processed, thinking=False))
    return prompts


def _alone(runner, image):
    """The embedding of ``image`` encoded on its own."""
    request = chat_request("r", "What is in the image?", images={"x": (1, 1)})
    prompt = runner.build_prompt(request.messages, [image], thinking=False)
    [encoded] = runner.encode_images([prompt], None)
    return encoded.embeddings[0]


def test_vision_work_encodes_each_new_image_once_in_one_pass(tiny_random_runner):
    runner = tiny_random_runner
    with_a, with_a_b, with_c, text = _image_prompts(runner)
    a, b, c = with_a.images[0], with_a_b.images[1], with_c.images[0]
    cache = ImageEmbeddingCache(64 * 2**20)
    [cached_c] = runner.encode_images([with_c], cache)  # c is in the cache now

    job = runner.start_vision([with_a, with_a_b, with_c, text], cache)
    # One pass over a (once, though two prompts hold it) and b; c comes from the cache.
    assert job.vision is not None
    assert job.vision.patches == [int(a.grid_thw.prod()), int(b.grid_thw.prod())]
    # Hits: a's second use, c. Misses: c before, then a and b.
    assert (cache.hits, cache.misses) == (2, 3)
    assert not job.done and job.blocks_left == runner.vision_weights.depth
    with pytest.raises(RuntimeError):
        job.results()
    job.run(1)
    assert job.blocks_left == runner.vision_weights.depth - 1
    job.run(job.blocks_left)
    assert job.done and job.block_cost() == 0.0
    results = job.results()
    assert [len(r.embeddings) for r in results] == [1, 2, 1, 0]
    exact = {"rtol": 0, "atol": 1e-12}
    torch.testing.assert_close(results[0].embeddings[0], _alone(runner, a), **exact)
    torch.testing.assert_close(results[1].embeddings[0], _alone(runner, a), **exact)
    torch.testing.assert_close(results[1].embeddings[1], _alone(runner, b), **exact)
    assert torch.equal(results[2].embeddings[0], cached_c.embeddings[0])
    # a counts as cached where the pass had already encoded it for an earlier prompt.
    assert [r.cached_tokens for r in results] == [0, a.tokens, c.tokens, 0]
    assert cache.get(a.key) is not None and cache.get(b.key) is not None


def _counting_backend(calls):
    def backend(graph_module, example_inputs):
        def run(*args):
            calls.append(len(args))
            return graph_module(*args)

        return run

    return backend


def test_a_compiled_prefill_gives_the_same_logits(fresh_runner, tiny_random_runner):
    calls: list[int] = []
    fresh_runner.compile_prefill(backend=_counting_backend(calls))
    assert fresh_runner.prefill_compiled
    for question in ("天气怎么样？", "Describe the picture."):
        torch.testing.assert_close(
            _one_piece(fresh_runner, question),
            _one_piece(tiny_random_runner, question),
            rtol=0,
            atol=1e-6,
        )
    assert calls  # the compiled halves ran
    assert fresh_runner.prefill_compile_error is None


def test_a_prefill_that_fails_to_compile_runs_eager(fresh_runner, tiny_random_runner):
    def failing_backend(graph_module, example_inputs):
        raise RuntimeError("no C++ compiler on this host")

    fresh_runner.compile_prefill(backend=failing_backend)
    torch.testing.assert_close(
        _one_piece(fresh_runner, "天气怎么样？"),
        _one_piece(tiny_random_runner, "天气怎么样？"),
        rtol=0,
        atol=1e-6,
    )
    assert not fresh_runner.prefill_compiled
    assert "no C++ compiler on this host" in fresh_runner.prefill_compile_error


def test_the_engine_compiles_the_prefill_when_configured(fresh_runner):
    from inference.engine import Engine, EngineConfig

    calls: list[int] = []
    Engine(fresh_runner, EngineConfig(max_seq_len=64))
    assert not fresh_runner.prefill_compiled  # the CPU default: eager
    Engine(
        fresh_runner,
        EngineConfig(
            max_seq_len=64, compile_prefill=True, compile_backend=_counting_backend(calls)
        ),
    )
    assert fresh_runner.prefill_compiled
