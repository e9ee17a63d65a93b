"""The baselines: ``model.generate`` naive, and with transformers' static cache (compiled).

Both take the same requests as the engine, with prompt building (image decode and
preprocessing) inside the timing. ``mode="batch"`` runs all requests as one left-padded
batch (what shared/notes/glm4v.md measured); ``"sequential"`` one after the other.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from inference.engine.prompt import PreparedPrompt
from inference.engine.runner import ModelRunner
from inference.protocol import InferenceRequest

from .workloads import Images, summary, sync


class _FirstTokenTimer:
    """A ``generate`` streamer noting when the first new tokens arrive (2nd ``put``)."""

    def __init__(self, device: torch.device, t0: float) -> None:
        self.device, self.t0, self.calls, self.first = device, t0, 0, None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:
            sync(self.device)
            self.first = time.perf_counter() - self.t0

    def end(self) -> None:
        pass


def _collate_left(prompts: list[PreparedPrompt], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(p.length for p in prompts)
    n = len(prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    mm = torch.zeros((n, width), dtype=torch.int)
    for row, p in enumerate(prompts):
        ids[row, width - p.length :] = p.input_ids[0]
        mask[row, width - p.length :] = 1
        mm[row, width - p.length :] = p.mm_token_type_ids[0]
    out = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": mm}
    with_images = [i for i in (p.model_inputs() for p in prompts) if "pixel_values" in i]
    if with_images:
        out["pixel_values"] = torch.cat([i["pixel_values"] for i in with_images])
        out["image_grid_thw"] = torch.cat([i["image_grid_thw"] for i in with_images])
    return out


def _generate(
    runner: ModelRunner, inputs: dict[str, torch.Tensor], new_tokens: int, t0: float, extra: dict
) -> tuple[int, float | None]:
    inputs = {k: v.to(runner.device) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(runner.dtype)
    timer = _FirstTokenTimer(runner.device, t0)
    with torch.inference_mode():
        out = runner.model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            streamer=timer,
            **extra,
        )
    sync(runner.device)
    return out.shape[1] - inputs["input_ids"].shape[1], timer.first


def run_generate(
    runner: ModelRunner,
    requests: Sequence[InferenceRequest],
    images: Images,
    *,
    new_tokens: int,
    mode: str = "batch",
    extra: dict | None = None,
) -> dict[str, Any]:
    """``model.generate`` on ``requests``: one left-padded batch (``mode="batch"``) or one
    after the other (``"sequential"``). ``extra`` goes to ``generate`` (e.g. the static cache)."""
    extra = extra or {}
    first, last, generated = {}, {}, {}
    sync(runner.device)
    t0 = time.perf_counter()
    prepare: list[Callable[[], PreparedPrompt]] = [
        lambda r=r: runner.prepare(r.messages, images, thinking=False) for r in requests
    ]
    if mode == "batch":
        prompts = [p() for p in prepare]
        inputs = _collate_left(prompts, runner.tokenizer.pad_token_id)
        n, ttft = _generate(runner, inputs, new_tokens, t0, extra)
        end = time.perf_counter() - t0
        for r in requests:
            first[r.request_id], last[r.request_id], generated[r.request_id] = ttft, end, n
    else:
        for r, p in zip(requests, prepare, strict=True):
            n, ttft = _generate(runner, p().model_inputs(), new_tokens, t0, extra)
            first[r.request_id] = ttft
            last[r.request_id] = time.perf_counter() - t0
            generated[r.request_id] = n
    return summary(first, last, generated, time.perf_counter() - t0)
