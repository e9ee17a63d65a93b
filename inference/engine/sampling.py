"""Next-token choice for a decode batch: greedy rows and temperature/top-p rows together.

Reproducibility: every sampled row draws its one uniform number per token from its own
request's ``torch.Generator`` (CPU, seeded from ``SamplingParams.seed``), so a seeded request
gives the same tokens whatever else shares the batch, given the same logits. The draw is
turned into a token by inverse-CDF over the top-p nucleus (``choose_tokens``), vectorised
over the batch and free of host synchronisation, so that the decode step's CUDA graph
samples on the device and only the token ids come back.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from inference.protocol import SamplingParams


@dataclass
class RowSampler:
    """Per-request sampling state: parameters and (when sampling) a private generator."""

    temperature: float
    top_p: float
    generator: torch.Generator | None

    @classmethod
    def for_params(cls, params: SamplingParams) -> RowSampler:
        if params.greedy:
            return cls(0.0, 1.0, None)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        return cls(params.temperature, params.top_p, torch.Generator().manual_seed(seed))

    @property
    def greedy(self) -> bool:
        return self.generator is None

    def draw(self) -> float:
        """The row's next uniform number (0.0 for a greedy row, which draws nothing)."""
        if self.generator is None:
            return 0.0
        return float(torch.rand(1, generator=self.generator))


def sample(logits: torch.Tensor, rows: Sequence[RowSampler]) -> list[int]:
    """One token per row of ``logits`` ``[batch, vocab]`` (draws one uniform per sampled row)."""
    if all(row.greedy for row in rows):
        return logits.argmax(dim=-1).tolist()
    params = torch.tensor(
        [[row.temperature, row.top_p, row.draw()] for row in rows], dtype=torch.float32
    ).to(logits.device)
    return choose_tokens(logits, params[:, 0], params[:, 1], params[:, 2]).tolist()


def choose_tokens(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """Next token ids ``[batch]``: argmax where ``temperature`` is 0, else a top-p draw.

    Tensors only, no host synchronisation: the decode step runs it inside its CUDA graph
    (``temperature``, ``top_p`` and ``uniform`` ``[batch]`` are static buffers there). A
    sampled row keeps the smallest prefix of its tokens, by probability, whose mass reaches
    ``top_p`` (the first always stays) and picks by inverse CDF at ``uniform``. Each row's
    result depends on its own inputs only, never on the other rows of the batch.
    """
    greedy = logits.argmax(dim=-1)
    sampled = temperature > 0
    # Greedy rows go through the same arithmetic at temperature 1 and are discarded: a 0
    # would put inf/NaN into the sort and the search below.
    safe_temperature = torch.where(sampled, temperature, torch.ones_like(temperature))
    probs = torch.softmax(logits.float() / safe_temperature.view(-1, 1), dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    cumulative = sorted_probs.cumsum(dim=-1)
    outside = (cumulative - sorted_probs) >= top_p.view(-1, 1)
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    kept_cumulative = sorted_probs.cumsum(dim=-1)
    target = uniform.view(-1, 1) * kept_cumulative[:, -1:]
    position = torch.searchsorted(kept_cumulative, target, right=True)
    # Guard the float edge where target equals the total mass. At least one token stays,
    # also for a row whose top_p is 0 (a padded row of the decode graph).
    kept = (~outside).sum(dim=-1, keepdim=True).clamp(min=1)
    position = torch.minimum(position, kept - 1)
    drawn = order.gather(-1, position).view(-1)
    return torch.where(sampled, drawn, greedy)
