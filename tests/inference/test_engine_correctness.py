"""The engine's greedy output under continuous batching equals ``model.generate`` alone.

This is the contract of the batching machinery (slot KV cache and its compaction, per-row
masks, per-row M-RoPE positions, padded batch buckets over static buffers, decode steps
launched ahead of their results, the decode attention kernels, packed and chunked prefill,
packed vision passes spread over steps, the image-embedding cache): requests of different prompt
lengths and image sizes join at different steps while others decode, share slots freed by
earlier requests, and still produce exactly the token ids each would get from
``model.generate(do_sample=False)`` run alone (float64, so no near-tie rounding).
"""

from __future__ import annotations

import pytest

from inference.engine import Engine, EngineConfig
from inference.engine import runner as runner_module
from inference.engine.vision_forward import VisionPass
from inference.protocol import DoneEvent
from tests.inference.conftest import chat_request, generate_alone, image_bytes

MAX_NEW = 20

# request id -> (question, {sha: (width, height)})
CASES = {
    "img-28x28": ("What is in the image?", {"a28": (28, 28)}),
    "img-56x84": ("图片里有什么？", {"b56": (56, 84)}),
    "text-only": ("天气怎么样？", {}),
    "img-112x56": ("Describe the picture.", {"c112": (112, 56)}),
    "two-images": ("How many apples are there?", {"d56": (56, 56), "e28": (28, 56)}),
    # The first request's image again, with a new question: an image-embedding cache hit.
    "same-image": ("Describe the picture.", {"a28": (28, 28)}),
}
# step at which each request is added (others are decoding by then)
ARRIVALS = {
    "img-28x28": 0,
    "text-only": 0,
    "img-56x84": 2,
    "img-112x56": 3,
    "two-images": 7,
    "same-image": 9,
}
# Engine settings that must not change a token: the defaults (each prompt in one packed
# prefill, inline preprocessing on CPU, batch buckets 1/2/3 with padding, grouped attention);
# tiny prefill budgets (prompts in chunks of at most 11 tokens, vision blocks spread over
# steps) with odd buckets and preprocessing threads; the same budgets with each vision pass
# whole in one step; the other decode attention kernels; and the decode layer compiled with
# inductor (what a GPU worker runs).
TINY_BUDGETS = {"prefill_budget_tokens": 11, "idle_prefill_budget_tokens": 11}
CONFIGS = {
    "default": {},
    "tiny-budgets": {
        **TINY_BUDGETS,
        "decode_batch_sizes": (2, 3),
        "decode_kv_lengths": (40, 100),
        "preprocess_threads": 2,
    },
    "whole-vision": {**TINY_BUDGETS, "chunk_vision": False},
    "sdpa": {"decode_attention": "sdpa"},
    "flex": {"decode_attention": "flex"},
    "compiled": {"compile_decode": True, "decode_kv_lengths": (256,)},
}
_expected: dict[str, dict[str, list[int]]] = {}


def _images() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for seed, (_, images) in enumerate(CASES.values()):
        for sha, (w, h) in images.items():
            out.setdefault(sha, image_bytes(w, h, seed=seed))
    return out


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("runner_fixture", ["tiny_runner", "tiny_random_runner"])
def test_greedy_continuous_batching_equals_generate_alone(
    request, runner_fixture, config_name, monkeypatch, tmp_path_factory
):
    """Trained model: realistic output with EOS endings. Random wide-init model: chaotic
    output, so a wrong position, mask or cache row changes its tokens."""
    runner = request.getfixturevalue(runner_fixture)
    config = dict(CONFIGS[config_name])
    if config.get("compile_decode"):
        # One inductor cache for the test session; the engine sets it for the process,
        # monkeypatch puts the previous value back afterwards.
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        config["compile_cache_dir"] = str(_inductor_cache(tmp_path_factory))
    prefills: list[int] = []  # the longest chunk of each packed prefill
    real_prefill = runner.prefill

    def prefill(cache, chunks):
        prefills.append(max(end - job.done for job, _, end in chunks))
        return real_prefill(cache, chunks)

    monkeypatch.setattr(runner, "prefill", prefill)
    vision_runs: list[int] = []

    class CountedPass(VisionPass):
        def run(self, blocks):
            if blocks:
                vision_runs.append(blocks)
            super().run(blocks)

    monkeypatch.setattr(runner_module, "VisionPass", CountedPass)
    images = _images()
    requests = {
        rid: chat_request(rid, q, images=imgs, max_tokens=MAX_NEW)
        for rid, (q, imgs) in CASES.items()
    }
    if runner_fixture not in _expected:
        _expected[runner_fixture] = {
            rid: generate_alone(runner, r, images, max_new_tokens=MAX_NEW)
            for rid, r in requests.items()
        }
    expected = _expected[runner_fixture]

    observed: dict[str, list[int]] = {rid: [] for rid in requests}
    # Three slots for six requests: later ones reuse slots holding stale KV.
    engine = Engine(
        runner,
        EngineConfig(
            max_batch_size=3,
            max_seq_len=256,
            token_observer=lambda rid, tok: observed[rid].append(tok),
            **config,
        ),
    )
    done: dict[str, DoneEvent] = {}
    step = 0
    while len(done) < len(requests):
        for rid, arrival in ARRIVALS.items():
            if arrival == step:
                engine.add_request(requests[rid], images)
        for rid, event in engine.step():
            if isinstance(event, DoneEvent):
                done[rid] = event
        step += 1
        assert step < 500

    for rid in requests:
        assert observed[rid] == expected[rid], rid
        assert done[rid].usage.completion_tokens == len(expected[rid])
    # The comparison is not vacuous: images were used and some runs went the full length,
    # decoding rows were moved between slots, batches were padded, an image was reused.
    assert any(len(ids) == MAX_NEW for ids in expected.values())
    assert len({tuple(ids) for ids in expected.values()}) == len(expected)
    assert engine.slots.moves > 0
    assert len(engine.decoder.runs) > 1
    assert done["same-image"].usage.cached_image_tokens == done["same-image"].usage.image_tokens
    assert done["img-28x28"].usage.cached_image_tokens == 0
    assert engine.stats().image_cache_hits == 1
    # The settings took effect: prompts were split under the tiny budgets (whole otherwise),
    # vision passes went a block a step only when chunked, the decode layer was compiled.
    depth = runner.vision_weights.depth
    if "prefill_budget_tokens" in config:
        assert max(prefills) <= 11
    else:
        assert max(prefills) > 11
    if config.get("chunk_vision", True) and "prefill_budget_tokens" in config:
        assert set(vision_runs) == {1}
    else:
        assert set(vision_runs) == {depth}
    compiled = engine.stats().compiled_batch_sizes
    assert compiled == ((1, 2, 3) if config.get("compile_decode") else ())
    assert engine.stats().compile_error is None


def _inductor_cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "inductor-cache"
