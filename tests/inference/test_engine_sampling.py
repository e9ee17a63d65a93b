"""Sampling: greedy rows, temperature/top-p rows, per-request seeded generators."""

from __future__ import annotations

import math

import torch

from inference.engine.sampling import RowSampler, sample
from inference.protocol import SamplingParams

LOGITS = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))


def _row(seed, temperature=1.0, top_p=1.0):
    return RowSampler.for_params(SamplingParams(temperature=temperature, top_p=top_p, seed=seed))


def test_greedy_rows_take_argmax_beside_sampled_rows():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    greedy = RowSampler.for_params(SamplingParams(temperature=0.0))
    tokens = sample(logits, [greedy, _row(0)])
    assert tokens[0] == 1 and tokens[1] in (0, 1, 2)


def test_frequencies_follow_softmax_and_top_p_cuts_the_tail():
    row = _row(7)
    counts = [0] * 4
    for _ in range(4000):
        counts[sample(LOGITS, [row])[0]] += 1
    for count, p in zip(counts, (0.5, 0.3, 0.15, 0.05), strict=True):
        assert math.isclose(count / 4000, p, abs_tol=0.03)
    nucleus = _row(7, top_p=0.75)  # 0.5 + 0.3 reaches 0.75: tokens 0 and 1 only
    seen = {sample(LOGITS, [nucleus])[0] for _ in range(500)}
    assert seen == {0, 1}
    tiny = _row(7, top_p=1e-6)
    assert {sample(LOGITS, [tiny])[0] for _ in range(50)} == {0}


def test_low_temperature_sharpens():
    cold = _row(3, temperature=0.05)
    assert {sample(LOGITS, [cold])[0] for _ in range(200)} == {0}


def test_same_seed_same_draws_whatever_the_batch():
    alone = [sample(LOGITS, [r])[0] for r in [_row(42)] for _ in range(30)]
    row, other = _row(42), _row(99)
    batched = [sample(LOGITS.repeat(2, 1), [other, row])[1] for _ in range(30)]
    assert alone == batched
