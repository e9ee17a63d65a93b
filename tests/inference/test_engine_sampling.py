"""Sampling: greedy rows, temperature/top-p rows, per-request seeded generators, and
``choose_tokens``, the tensor-only choice the decode step runs in its graph."""

from __future__ import annotations

import math

import torch

from inference.engine.sampling import RowSampler, choose_tokens, sample
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


def _choose(logits, temperature, top_p, uniform):
    def column(value):
        return torch.tensor(value, dtype=torch.float32)

    return choose_tokens(logits, column(temperature), column(top_p), column(uniform)).tolist()


def test_a_draw_picks_its_token_by_inverse_cdf_over_the_nucleus():
    logits = LOGITS.repeat(5, 1)
    # Cumulative mass 0.5, 0.8, 0.95, 1.0: each uniform falls in one token's interval.
    assert _choose(logits, [1.0] * 5, [1.0] * 5, [0.1, 0.49, 0.6, 0.9, 0.99]) == [0, 0, 1, 2, 3]
    # top_p 0.75 keeps tokens 0 and 1 (mass 0.8), renormalised: token 0 below 0.625.
    assert _choose(logits[:4], [1.0] * 4, [0.75] * 4, [0.0, 0.6, 0.65, 0.999]) == [0, 0, 1, 1]


def test_each_row_depends_on_its_own_inputs_only():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    temperature, top_p, uniform = [0.0, 1.0, 0.5, 1.3], [1.0, 0.9, 0.6, 1.0], [0.3, 0.7, 0.2, 0.9]
    batched = _choose(logits, temperature, top_p, uniform)
    alone = [
        _choose(logits[i : i + 1], temperature[i : i + 1], top_p[i : i + 1], uniform[i : i + 1])[0]
        for i in range(4)
    ]
    assert batched == alone
    assert batched[0] == int(logits[0].argmax())


def test_greedy_rows_take_the_argmax_whatever_their_top_p_and_draw():
    """The decode graph's padded rows are greedy rows with top_p 0 and draw 0: they must not
    make the step fail (an out-of-range index) or disturb the other rows."""
    torch.manual_seed(1)
    logits = torch.randn(3, 50)
    tokens = _choose(logits, [0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.5, 1.0])
    assert tokens[0] == int(logits[0].argmax()) and tokens[2] == int(logits[2].argmax())
    assert tokens[1] == _choose(logits[1:2], [1.0], [1.0], [0.5])[0]


def test_a_greedy_row_draws_nothing_and_seeded_rows_repeat_their_draws():
    greedy = RowSampler.for_params(SamplingParams(temperature=0.0))
    assert greedy.greedy and greedy.draw() == 0.0
    first, second = _row(5), _row(5)
    draws = [first.draw() for _ in range(5)]
    assert draws == [second.draw() for _ in range(5)]
    assert all(0.0 <= u < 1.0 for u in draws) and len(set(draws)) == 5
