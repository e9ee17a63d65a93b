"""Prefill: chunking across steps, the image-embedding cache, batched vision, preprocessing.

Float64 tiny models (conftest), so token-for-token comparisons are exact.
"""

from __future__ import annotations

import threading

import pytest
import torch

from inference.protocol import DeltaEvent, DoneEvent, StartEvent
from tests.inference.conftest import chat_request, image_bytes, run_to_completion

IMAGE = {"img": (112, 84)}


def _tokens(make_engine, requests, images, **config):
    tokens: dict[str, list[int]] = {}
    engine = make_engine(
        token_observer=lambda rid, tok: tokens.setdefault(rid, []).append(tok), **config
    )
    for request in requests:
        engine.add_request(request, images)
    events = run_to_completion(engine)
    return tokens, events, engine


def _generate(runner, request, images, max_new):
    prompt = runner.prepare(request.messages, images, thinking=False)
    with torch.inference_mode():
        out = runner.model.generate(
            **prompt.model_inputs(), do_sample=False, max_new_tokens=max_new
        )
    return out[0, prompt.length :].tolist()


@pytest.fixture
def random_engine(tiny_random_runner):
    from inference.engine import Engine, EngineConfig

    def factory(**config):
        config.setdefault("max_seq_len", 256)
        return Engine(tiny_random_runner, EngineConfig(**config))

    return factory


def _vision_calls(runner):
    calls = []
    handle = runner.model.model.visual.register_forward_hook(
        lambda module, args, out: calls.append(args[0].shape[0])
    )
    return calls, handle


def test_chunked_prefill_gives_the_same_tokens_as_one_piece(random_engine, tiny_random_runner):
    images = {"img": image_bytes(112, 84, seed=5)}
    requests = [
        chat_request("image", "What is in the image?", images=IMAGE, max_tokens=12),
        chat_request("text", "天气怎么样？", max_tokens=12),
    ]
    whole, _, _ = _tokens(random_engine, requests, images, prefill_chunk_tokens=None)
    chunked, events, _ = _tokens(random_engine, requests, images, prefill_chunk_tokens=5)
    assert chunked == whole
    assert whole["image"] == _generate(tiny_random_runner, requests[0], images, 12)
    start = next(e for rid, e in events if rid == "image" and isinstance(e, StartEvent))
    assert start.prompt_tokens > 3 * 5  # the prompt really took several chunks


def test_running_streams_get_a_token_every_step_during_a_long_prefill(make_engine):
    counts: dict[str, int] = {}
    engine = make_engine(
        max_batch_size=2,
        prefill_chunk_tokens=8,
        token_observer=lambda rid, tok: counts.__setitem__(rid, counts.get(rid, 0) + 1),
    )
    engine.add_request(chat_request("stream", "Describe the picture.", max_tokens=60), {})
    while "stream" not in counts:  # its own prompt takes a few chunks of 8
        engine.step()
    engine.add_request(
        chat_request("large", "What is in the image?", images=IMAGE, max_tokens=4),
        {"img": image_bytes(112, 84)},
    )
    steps_prefilling = 0
    for _ in range(50):
        before = counts["stream"]
        events = engine.step()
        assert counts["stream"] == before + 1  # the running stream was not stalled
        if any(rid == "large" and isinstance(e, StartEvent) for rid, e in events):
            break
        # Before its prefill starts the image may still be preprocessed in a thread.
        steps_prefilling += engine.stats().prefilling
    assert steps_prefilling >= 3
    assert isinstance(run_to_completion(engine)[-1][1], DoneEvent)


def test_same_image_new_question_skips_the_vision_tower(random_engine, tiny_random_runner):
    runner = tiny_random_runner
    images = {"img": image_bytes(112, 84, seed=7)}
    first = chat_request("first", "What is in the image?", images=IMAGE, max_tokens=10)
    second = chat_request("second", "Describe the picture.", images=IMAGE, max_tokens=10)
    other_tenant = chat_request(
        "other", "Describe the picture.", images=IMAGE, tenant_id="tenant-b", max_tokens=10
    )
    calls, handle = _vision_calls(runner)
    tokens: dict[str, list[int]] = {}
    engine = random_engine(token_observer=lambda rid, t: tokens.setdefault(rid, []).append(t))
    try:
        engine.add_request(first, images)
        done = {rid: e for rid, e in run_to_completion(engine) if isinstance(e, DoneEvent)}
        assert len(calls) == 1 and done["first"].usage.cached_image_tokens == 0
        engine.add_request(second, images)
        done.update((rid, e) for rid, e in run_to_completion(engine) if isinstance(e, DoneEvent))
        assert len(calls) == 1  # no second vision pass
        usage = done["second"].usage
        assert usage.cached_image_tokens == usage.image_tokens > 0
        assert engine.stats().image_cache_hits == 1
        engine.add_request(other_tenant, images)
        run_to_completion(engine)
        assert len(calls) == 2  # entries are tenant-scoped
    finally:
        handle.remove()
    assert tokens["second"] == _generate(runner, second, images, 10)
    assert tokens["other"] == tokens["second"]


def test_requests_admitted_together_share_one_vision_pass(random_engine, tiny_random_runner):
    runner = tiny_random_runner
    images = {f"i{n}": image_bytes(56 + 28 * n, 56, seed=n) for n in range(3)}
    requests = [
        chat_request(f"r{n}", "What is in the image?", images={f"i{n}": (56 + 28 * n, 56)})
        for n in range(3)
    ]
    requests = [r.__class__(**{**_fields(r), "sampling": _max_tokens(r, 8)}) for r in requests]
    calls, handle = _vision_calls(runner)
    try:
        tokens, _, engine = _tokens(
            random_engine, requests, images, max_batch_size=3, prefills_per_step=3
        )
    finally:
        handle.remove()
    assert len(calls) == 1  # one batched pass over the three images
    assert engine.stats().image_cache_misses == 3
    for request in requests:
        assert tokens[request.request_id] == _generate(runner, request, images, 8)


def test_images_are_preprocessed_in_the_pool_and_match_the_reference_prompt(
    make_engine, tiny_runner, monkeypatch
):
    threads: list[str] = []
    real = tiny_runner.process_images

    def process_images(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(tiny_runner, "process_images", process_images)
    images = {"a": image_bytes(56, 84, seed=1), "b": image_bytes(28, 56, seed=2)}
    request = chat_request(
        "r", "How many apples are there?", images={"a": (56, 84), "b": (28, 56)}, max_tokens=6
    )
    engine = make_engine(preprocess_threads=1)
    engine.add_request(request, images)
    events = run_to_completion(engine)
    assert threads and all(name.startswith("engine-images") for name in threads)
    assert any(isinstance(e, DeltaEvent) for _, e in events)
    engine.close()

    # The engine's per-image path builds the same model inputs as the one-call reference.
    processed = real(request.messages, images, scope="tenant-a")
    ours = tiny_runner.build_prompt(request.messages, processed, thinking=False).model_inputs()
    reference = tiny_runner.prepare(request.messages, images, thinking=False).model_inputs()
    assert ours.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(ours[key], value), key
    other = real(request.messages, images, scope="tenant-b")
    assert [p.key for p in processed] != [p.key for p in other]


def _fields(struct):
    return {f: getattr(struct, f) for f in struct.__struct_fields__}


def _max_tokens(request, n):
    return request.sampling.__class__(**{**_fields(request.sampling), "max_tokens": n})


def test_cancel_during_a_chunked_prefill_frees_its_slot(make_engine):
    engine = make_engine(max_batch_size=1, prefill_chunk_tokens=4, preprocess_threads=0)
    engine.add_request(chat_request("long", "Describe the picture.", max_tokens=5), {})
    engine.add_request(chat_request("next", "天气怎么样？", max_tokens=3), {})
    engine.step()
    assert engine.stats().prefilling == 1 and engine.stats().kv_used_tokens == 4
    engine.abort("long")
    events = engine.step()
    [(rid, done)] = [(rid, e) for rid, e in events if isinstance(e, DoneEvent)]
    assert rid == "long" and done.finish_reason == "cancelled"
    finished = [rid for rid, e in run_to_completion(engine) if isinstance(e, DoneEvent)]
    assert finished == ["next"]  # it got the freed slot


def test_out_of_memory_in_a_shared_vision_pass_fails_only_the_large_request(
    make_engine, tiny_runner, monkeypatch
):
    real = tiny_runner._vision

    def vision(images):
        if sum(image.pixel_values.shape[0] for image in images) > 500:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(images)

    monkeypatch.setattr(tiny_runner, "_vision", vision)
    sizes = {"small0": 56, "large": 448, "small1": 84}
    images = {sha: image_bytes(size, size, seed=i) for i, (sha, size) in enumerate(sizes.items())}
    engine = make_engine(max_batch_size=3, prefills_per_step=3, preprocess_threads=0)
    for sha, size in sizes.items():
        request = chat_request(sha, "What is in the image?", images={sha: (size, size)})
        engine.add_request(
            request.__class__(**{**_fields(request), "sampling": _max_tokens(request, 3)}), images
        )
    last = {rid: e for rid, e in run_to_completion(engine)}
    assert last["large"].code == "out_of_memory" and last["large"].retryable
    assert isinstance(last["small0"], DoneEvent) and isinstance(last["small1"], DoneEvent)
