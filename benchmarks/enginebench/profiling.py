"""Where the time of a request goes: the stages of a first token, and a decode step's kernels.

- ``ttft_stages``: one standard request's way to its first token, stage by stage, device
  synchronised after each (image decode on the CPU, prompt build, the image's upload and
  resize/normalise/patchify on the device, vision tower, input embeddings and M-RoPE
  positions, text prefill, ``lm_head`` and sampling), into a free slot of an idle engine;
  the sum is a TTFT without queueing;
- ``decode_profile``: ``torch.profiler`` over engine steps that decode ``batch`` rows: device
  kernel time per step against wall time per step (what is left is host work: Python,
  launches, sampling, detokenising), and the kernels that take the most time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from inference.engine import Engine
from inference.engine.runner import EncodedImages
from inference.engine.sampling import RowSampler, sample
from inference.engine.vision_forward import VisionPass
from inference.protocol import InferenceRequest

from .workloads import Images, decoding, sync, timed_steps


def ttft_stages(engine: Engine, request: InferenceRequest, images: Images) -> dict[str, float]:
    """Seconds per stage of ``request``'s prefill, run alone into a free slot (idle engine)."""
    if engine.has_unfinished():
        raise RuntimeError("ttft_stages needs an idle engine")
    runner, device = engine.runner, engine.runner.device
    stages: dict[str, float] = {}

    def timed(name: str, fn: Any) -> Any:
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        stages[name] = time.perf_counter() - t
        return out

    with torch.inference_mode():
        processed = timed(
            "image decode (CPU)",
            lambda: runner.process_images(request.messages, images, scope=request.tenant_id),
        )
        prompt = timed(
            "prompt (template, tokens)",
            lambda: runner.build_prompt(request.messages, processed, thinking=False),
        )
        pixels = timed(
            "image upload, resize, normalise (device)",
            lambda: torch.cat(
                [i.model_pixels(device=device, dtype=runner.dtype) for i in prompt.images]
            ),
        )
        grids = torch.stack([image.grid_thw for image in prompt.images])

        def vision() -> list[torch.Tensor]:
            vision_pass = VisionPass(runner.vision_weights, pixels, grids)
            vision_pass.run(vision_pass.weights.depth)
            return vision_pass.finish()

        embeddings = timed("vision tower", vision)
        job = timed(
            "embeddings + M-RoPE",
            lambda: runner.begin_prefill(prompt, EncodedImages(embeddings)),
        )
        logits = timed(
            "text prefill + lm_head",
            lambda: runner.prefill_chunk(engine.cache, job, 0, job.length),
        )
        timed(
            "sampling",
            lambda: sample(logits.view(1, -1), [RowSampler(0.0, 1.0, None)]),
        )
    stages["total"] = sum(stages.values())
    stages["prompt_tokens"] = prompt.length
    return stages


def decode_profile(
    engine: Engine,
    requests: Sequence[InferenceRequest],
    images: Images,
    *,
    steps: int,
    tag: str,
    table_path: Path | None = None,
) -> dict[str, Any]:
    """Profile ``steps`` engine steps while ``len(requests)`` requests decode.

    With CUDA graphs the kernels of a replay are listed where the profiler sees inside
    graphs (CUPTI does on recent drivers); ``device_ms_per_step`` is their sum per step.
    On CPU there is no device: the table lists CPU operators. Writes the profiler's table to
    ``table_path`` when given.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = engine.runner.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with decoding(engine, requests, images, steps=steps + 2, tag=tag):
        timed_steps(engine, 2)  # the first decode steps of a new batch size warm up
        with profile(activities=activities) as prof:
            times = timed_steps(engine, steps)
    averages = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = [e for e in averages if getattr(e, key, 0) > 0]
    rows.sort(key=lambda e: getattr(e, key), reverse=True)
    if table_path is not None:
        table_path.write_text(averages.table(sort_by=key, row_limit=40))
    device_total_s = sum(getattr(e, key) for e in rows) / 1e6 if cuda else 0.0
    return {
        "batch": len(requests),
        "steps": steps,
        "wall_ms_per_step": statistics.median(times) * 1e3,
        "device_ms_per_step": device_total_s / steps * 1e3 if cuda else None,
        "top": [
            {"name": e.key[:80], "calls": e.count, "ms_per_step": getattr(e, key) / 1e3 / steps}
            for e in rows[:12]
        ],
    }
