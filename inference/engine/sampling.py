"""Next-token choice for a decode batch: greedy rows and temperature/top-p rows together.

Reproducibility: every sampled row draws its one uniform number from its own request's
``torch.Generator`` (CPU, seeded from ``SamplingParams.seed``), so a seeded request gives the
same tokens whatever else shares the batch, given the same logits. The draw is turned into a
token by inverse-CDF over the top-p nucleus, vectorised over the batch.
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


def sample(logits: torch.Tensor, rows: Sequence[RowSampler]) -> list[int]:
    """One token per row of ``logits`` ``[batch, vocab]`` (float32)."""
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, row in enumerate(rows) if not row.greedy]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        picks = _sample_top_p(logits.index_select(0, index), [rows[i] for i in sampled])
        tokens = tokens.index_copy(0, index, picks)
    return tokens.tolist()


def _sample_top_p(logits: torch.Tensor, rows: Sequence[RowSampler]) -> torch.Tensor:
    device = logits.device
    temperature = torch.tensor([r.temperature for r in rows], device=device).view(-1, 1)
    top_p = torch.tensor([r.top_p for r in rows], device=device).view(-1, 1)
    # One uniform per row from its own generator; drawn on CPU so the stream does not
    # depend on the device.
    uniform = torch.cat([torch.rand(1, generator=r.generator) for r in rows]).to(device)

    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    cumulative = sorted_probs.cumsum(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    outside = (cumulative - sorted_probs) >= top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    kept_cumulative = sorted_probs.cumsum(dim=-1)
    target = uniform.view(-1, 1) * kept_cumulative[:, -1:]
    position = torch.searchsorted(kept_cumulative, target, right=True)
    # Guard the float edge where target equals the total mass.
    kept = (~outside).sum(dim=-1, keepdim=True)
    position = torch.minimum(position, kept - 1)
    return order.gather(-1, position).view(-1)
