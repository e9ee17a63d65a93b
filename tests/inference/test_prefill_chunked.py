"""Prefill: the per-step budget (prompt chunks and vision blocks spread over steps), the
image-embedding cache, packed vision passes, preprocessing.

Float64 tiny models (conftest), so token-for-token comparisons are exact.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch

from inference.engine import runner as runner_module
from inference.engine.vision_forward import VisionPass
from inference.protocol import DeltaEvent, DoneEvent, StartEvent
from tests.inference.conftest import (
    chat_request,
    generate_alone,
    image_bytes,
    run_to_completion,
)

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
    return generate_alone(runner, request, images, max_new_tokens=max_new)


@pytest.fixture
def random_engine(tiny_random_runner):
    from inference.engine import Engine, EngineConfig

    def factory(**config):
        config.setdefault("max_seq_len", 256)
        return Engine(tiny_random_runner, EngineConfig(**config))

    return factory


class _VisionSpy:
    """Records every vision pass the engine starts (its images' patch counts) and every
    ``run(blocks)`` on one, with the engine step it happened in (``step(engine)``)."""

    def __init__(self, monkeypatch):
        self.passes: list[list[int]] = []
        self.runs: list[tuple[int, int]] = []  # (step, blocks)
        self.steps = 0
        spy = self

        class Recorded(VisionPass):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                spy.passes.append(list(self.patches))

            def run(self, blocks):
                spy.runs.append((spy.steps, blocks))
                super().run(blocks)

        monkeypatch.setattr(runner_module, "VisionPass", Recorded)

    def step(self, engine):
        self.steps += 1
        return engine.step()


def _prefill_calls(runner, monkeypatch):
    """The new tokens of every packed prefill call, per chunk."""
    calls: list[list[int]] = []
    real = runner.prefill

    def prefill(cache, chunks):
        calls.append([end - job.done for job, _, end in chunks])
        return real(cache, chunks)

    monkeypatch.setattr(runner, "prefill", prefill)
    return calls


def test_a_small_budget_gives_the_same_tokens_as_one_piece(
    random_engine, tiny_random_runner, monkeypatch
):
    images = {"img": image_bytes(112, 84, seed=5)}
    requests = [
        chat_request("image", "What is in the image?", images=IMAGE, max_tokens=12),
        chat_request("text", "天气怎么样？", max_tokens=12),
    ]
    whole, _, _ = _tokens(random_engine, requests, images)
    calls = _prefill_calls(tiny_random_runner, monkeypatch)
    chunked, events, _ = _tokens(
        random_engine, requests, images, prefill_budget_tokens=5, idle_prefill_budget_tokens=5
    )
    assert chunked == whole
    assert whole["image"] == _generate(tiny_random_runner, requests[0], images, 12)
    start = next(e for rid, e in events if rid == "image" and isinstance(e, StartEvent))
    # Every packed call stayed within the budget, so the prompts took many of them.
    assert all(sum(call) <= 5 for call in calls)
    assert len(calls) > start.prompt_tokens / 5


def test_running_streams_get_a_token_every_step_during_a_long_prefill(
    make_engine, tiny_runner, monkeypatch
):
    counts: dict[str, int] = {}
    engine = make_engine(
        max_batch_size=2,
        prefill_budget_tokens=8,
        idle_prefill_budget_tokens=8,
        token_observer=lambda rid, tok: counts.__setitem__(rid, counts.get(rid, 0) + 1),
    )
    engine.add_request(chat_request("stream", "Describe the picture.", max_tokens=60), {})
    while counts.get("stream", 0) < 2:  # prefilled 8 tokens a step, then decoding
        engine.step()
    calls = _prefill_calls(tiny_runner, monkeypatch)
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
        steps_prefilling += engine.stats().prefilling
    assert steps_prefilling >= 3
    assert calls and all(sum(call) <= 8 for call in calls)
    assert isinstance(run_to_completion(engine)[-1][1], DoneEvent)


@pytest.mark.parametrize(
    ("chunk_vision", "budget_blocks"),
    [(True, 0.1), (True, 1.5), (False, 0.1)],
    ids=["chunked-budget-below-a-block", "chunked-budget-of-1.5-blocks", "whole"],
)
def test_vision_blocks_are_spread_over_steps_only_when_chunked(
    make_engine, tiny_runner, monkeypatch, chunk_vision, budget_blocks
):
    """A step runs the vision blocks its prefill budget holds, and at least one; with
    ``chunk_vision=False`` the whole tower in the step that starts the pass."""
    request = chat_request(
        "image", "What is in the image?", images={"img": (224, 224)}, max_tokens=4
    )
    images = {"img": image_bytes(224, 224)}
    [image] = tiny_runner.process_images(request.messages, images, scope="tests")
    block = tiny_runner.vision_weights.layer_cost([int(image.grid_thw.prod())])
    budget = math.ceil(budget_blocks * block / tiny_runner.text_weights.flops_per_token())
    spy = _VisionSpy(monkeypatch)
    counts: dict[str, int] = {}
    engine = make_engine(
        max_batch_size=2,
        prefill_budget_tokens=budget,
        chunk_vision=chunk_vision,
        token_observer=lambda rid, tok: counts.__setitem__(rid, counts.get(rid, 0) + 1),
    )
    engine.add_request(chat_request("stream", "Describe the picture.", max_tokens=60), {})
    while counts.get("stream", 0) < 2:
        spy.step(engine)
    engine.add_request(request, images)
    while "image" not in counts:
        before = counts["stream"]
        spy.step(engine)
        assert counts["stream"] == before + 1  # the stream kept its pace meanwhile
    depth = tiny_runner.vision_weights.depth
    runs = [(step, blocks) for step, blocks in spy.runs if blocks]
    if chunk_vision:
        assert [blocks for _, blocks in runs] == [1] * depth  # one block a step
        assert len({step for step, _ in runs}) == depth
    else:
        assert runs == [(runs[0][0], depth)]  # the whole tower in one step


def test_same_image_new_question_skips_the_vision_tower(
    random_engine, tiny_random_runner, monkeypatch
):
    runner = tiny_random_runner
    images = {"img": image_bytes(112, 84, seed=7)}
    first = chat_request("first", "What is in the image?", images=IMAGE, max_tokens=10)
    second = chat_request("second", "Describe the picture.", images=IMAGE, max_tokens=10)
    other_tenant = chat_request(
        "other", "Describe the picture.", images=IMAGE, tenant_id="tenant-b", max_tokens=10
    )
    spy = _VisionSpy(monkeypatch)
    tokens: dict[str, list[int]] = {}
    engine = random_engine(token_observer=lambda rid, t: tokens.setdefault(rid, []).append(t))
    engine.add_request(first, images)
    done = {rid: e for rid, e in run_to_completion(engine) if isinstance(e, DoneEvent)}
    assert len(spy.passes) == 1 and done["first"].usage.cached_image_tokens == 0
    engine.add_request(second, images)
    done.update((rid, e) for rid, e in run_to_completion(engine) if isinstance(e, DoneEvent))
    assert len(spy.passes) == 1  # no second vision pass
    usage = done["second"].usage
    assert usage.cached_image_tokens == usage.image_tokens > 0
    assert engine.stats().image_cache_hits == 1
    engine.add_request(other_tenant, images)
    run_to_completion(engine)
    assert len(spy.passes) == 2  # entries are tenant-scoped
    assert tokens["second"] == _generate(runner, second, images, 10)
    assert tokens["other"] == tokens["second"]


def test_requests_admitted_together_share_one_vision_pass(
    random_engine, tiny_random_runner, monkeypatch
):
    runner = tiny_random_runner
    images = {f"i{n}": image_bytes(56 + 28 * n, 56, seed=n) for n in range(3)}
    requests = [
        chat_request(
            f"r{n}", "What is in the image?", images={f"i{n}": (56 + 28 * n, 56)}, max_tokens=8
        )
        for n in range(3)
    ]
    spy = _VisionSpy(monkeypatch)
    tokens, _, engine = _tokens(random_engine, requests, images, max_batch_size=3)
    assert len(spy.passes) == 1 and len(spy.passes[0]) == 3  # one pass, three images
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


def test_cancel_during_a_chunked_prefill_frees_its_slot(make_engine):
    engine = make_engine(
        max_batch_size=1,
        prefill_budget_tokens=4,
        idle_prefill_budget_tokens=4,
        preprocess_threads=0,
    )
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
    make_engine, monkeypatch
):
    class OutOfMemoryOnLargePasses(VisionPass):
        def run(self, blocks):
            if sum(self.patches) > 500:
                raise torch.OutOfMemoryError("CUDA out of memory")
            super().run(blocks)

    monkeypatch.setattr(runner_module, "VisionPass", OutOfMemoryOnLargePasses)
    sizes = {"small0": 56, "large": 448, "small1": 84}
    images = {sha: image_bytes(size, size, seed=i) for i, (sha, size) in enumerate(sizes.items())}
    engine = make_engine(max_batch_size=6, preprocess_threads=0)
    for sha, size in sizes.items():
        engine.add_request(
            chat_request(sha, "What is in the image?", images={sha: (size, size)}, max_tokens=3),
            images,
        )
    last = {rid: e for rid, e in run_to_completion(engine)}
    assert last["large"].code == "out_of_memory" and last["large"].retryable
    assert isinstance(last["small0"], DoneEvent) and isinstance(last["small1"], DoneEvent)


def test_cancel_during_a_shared_vision_pass_spares_the_other_request(
    random_engine, tiny_random_runner, monkeypatch
):
    images = {"i0": image_bytes(112, 84, seed=0), "i1": image_bytes(448, 448, seed=1)}
    keep = chat_request("keep", "What is in the image?", images={"i0": (112, 84)}, max_tokens=8)
    drop = chat_request("drop", "Describe the picture.", images={"i1": (448, 448)}, max_tokens=8)
    spy = _VisionSpy(monkeypatch)
    # Room in the budget to admit both prompts together, not for one block of their pass
    # (attention over the large image's 1024 patches): a block a step.
    engine = random_engine(max_batch_size=4, max_seq_len=512, idle_prefill_budget_tokens=600)
    engine.add_request(keep, images)
    engine.add_request(drop, images)
    events = spy.step(engine)
    assert len(spy.passes) == 1 and len(spy.passes[0]) == 2  # both images in one pass
    assert engine.stats().running == 2
    engine.abort("drop")
    events += spy.step(engine)
    assert engine.stats().running == 1  # its slot went back
    events += run_to_completion(engine)
    by_request: dict[str, list] = {}
    for rid, event in events:
        by_request.setdefault(rid, []).append(event)
    [done] = by_request["drop"]  # nothing started for it
    assert isinstance(done, DoneEvent) and done.finish_reason == "cancelled"
    assert isinstance(by_request["keep"][-1], DoneEvent)
    assert [blocks for _, blocks in spy.runs if blocks] == [1] * len(spy.runs)
    assert len(spy.passes) == 1  # the pass went on for the request that stayed
    assert by_request["keep"][-1].usage.completion_tokens == 8
    tokens: dict[str, list[int]] = {}
    check = random_engine(
        max_seq_len=512, token_observer=lambda rid, t: tokens.setdefault(rid, []).append(t)
    )
    check.add_request(keep, images)
    run_to_completion(check)
    assert tokens["keep"] == _generate(tiny_random_runner, keep, images, 8)
