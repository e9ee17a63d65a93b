"""The engine's greedy output under continuous batching equals ``model.generate`` alone.

This is the contract of the batching machinery (slot KV cache and its compaction, per-row
masks, per-row M-RoPE positions, padded batch buckets over static buffers, grouped-query
attention, chunked prefill, the image-embedding cache): requests of different prompt
lengths and image sizes join at different steps while others decode, share slots freed by
earlier requests, and still produce exactly the token ids each would get from
``model.generate(do_sample=False)`` run alone (float64, so no near-tie rounding).
"""

from __future__ import annotations

import pytest
import torch

from inference.engine import Engine, EngineConfig
from inference.protocol import DoneEvent
from tests.inference.conftest import chat_request, image_bytes

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
# Engine settings that must not change a token: the defaults (one chunk per prompt, inline
# preprocessing on CPU, batch buckets 1/2/3 with padding, grouped attention), tiny prefill
# chunks with odd buckets, preprocessing in threads and the model's own attention, and the
# decode step's per-layer parts compiled with inductor (what a GPU worker may turn on).
CONFIGS = {
    "default": {},
    "compiled": {"compile_batch_sizes": (1, 2, 3), "decode_kv_lengths": (256,)},
    "chunked": {
        "prefill_chunk_tokens": 11,
        "decode_batch_sizes": (2, 3),
        "decode_kv_lengths": (40, 100),
        "preprocess_threads": 2,
        "decode_attention": "model",
    },
}
_expected: dict[str, dict[str, list[int]]] = {}


def _images() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for seed, (_, images) in enumerate(CASES.values()):
        for sha, (w, h) in images.items():
            out.setdefault(sha, image_bytes(w, h, seed=seed))
    return out


def _reference(runner, request, images) -> list[int]:
    prompt = runner.prepare(request.messages, images, thinking=request.sampling.thinking)
    with torch.inference_mode():
        out = runner.model.generate(
            **prompt.model_inputs(), do_sample=False, max_new_tokens=MAX_NEW
        )
    return out[0, prompt.length :].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("runner_fixture", ["tiny_runner", "tiny_random_runner"])
def test_greedy_continuous_batching_equals_generate_alone(request, runner_fixture, config_name):
    """Trained model: realistic output with EOS endings. Random wide-init model: chaotic
    output, so a wrong position, mask or cache row changes its tokens."""
    runner = request.getfixturevalue(runner_fixture)
    images = _images()
    requests = {
        rid: chat_request(rid, q, images=imgs, max_tokens=MAX_NEW)
        for rid, (q, imgs) in CASES.items()
    }
    if runner_fixture not in _expected:
        _expected[runner_fixture] = {
            rid: _reference(runner, r, images) for rid, r in requests.items()
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
            **CONFIGS[config_name],
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
