"""Engine against naive ``model.generate``: time to first token and tokens/s at 1, 8, 32 streams.

Standard request: one 672x672 image + a ~30-token question, 64 new tokens, greedy. EOS is
disabled on both sides (engine: no EOS ids; generate: ``min_new_tokens``) so every request
generates exactly ``--new-tokens``.

- Engine: all requests submitted at t=0, ``step()`` until done (continuous batching;
  ``--prefills-per-step`` prompts are prefilled per step while the others decode).
- Naive: ``model.generate`` on the same requests, either all at once as one left-padded
  batch (``--naive batch``, default; what the anchor in shared/notes/glm4v.md measured) or
  one request after the other (``--naive sequential``).

Definitions: TTFT = submit -> first token sampled (mean and max over requests); per-stream
tokens/s = mean over requests of new tokens / (submit -> last token); total tokens/s =
all new tokens / wall time. Each figure is the fastest of ``--repeat`` runs (shared machines
are noisy); engine and naive runs alternate.

CPU (tiny model, built into a temp dir):   .venv/bin/python benchmarks/engine.py
GPU (random full-size GLM-4.6V-Flash, bf16, no download):
    .venv/bin/python benchmarks/engine.py --full-size
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.engine import Engine, EngineConfig
from inference.engine.prompt import PreparedPrompt, PromptBuilder
from inference.engine.runner import ModelRunner
from inference.protocol import (
    DoneEvent,
    ImagePart,
    ImageRef,
    InferenceRequest,
    Message,
    SamplingParams,
    StartEvent,
    TextPart,
)
from inference.tiny_model import build_tiny_model, tiny_config_dict

QUESTION_WORDS = (
    "Please look at this picture carefully and describe what you see in it , including the "
    "colours , the objects , the people and what they are doing right now in the scene ."
).split()


def full_size_runner(tiny_dir: Path, device: torch.device) -> ModelRunner:
    """A randomly initialised GLM-4.6V-Flash-sized model (10B, bf16), built on the device.

    Tokenizer and image processor come from the tiny checkpoint (token ids are read from
    it, as always); the architecture is the real one (shared/notes/glm4v.md).
    """
    from transformers import GenerationConfig, Glm4vConfig, Glm4vForConditionalGeneration

    prompts = PromptBuilder.from_pretrained(str(tiny_dir), local_files_only=True)
    cfg = tiny_config_dict(prompts.tokenizer, vocab_size=151552)
    cfg["text_config"].update(
        hidden_size=4096,
        intermediate_size=13696,
        num_hidden_layers=40,
        num_attention_heads=32,
        num_key_value_heads=2,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "mrope_section": [8, 12, 12],
        },
    )
    cfg["vision_config"].update(
        depth=24, hidden_size=1536, num_heads=12, intermediate_size=13696, out_hidden_size=4096
    )
    config = Glm4vConfig(**cfg)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = Glm4vForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.generation_config = GenerationConfig(
        eos_token_id=cfg["text_config"]["eos_token_id"],
        pad_token_id=cfg["text_config"]["pad_token_id"],
    )
    return ModelRunner(model.eval(), prompts, device=device)


def make_requests(n: int, image_size: int, question_tokens: int, tokenizer: Any):
    from io import BytesIO

    import numpy as np
    from PIL import Image

    words: list[str] = []
    while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) < question_tokens:
        words.append(QUESTION_WORDS[len(words) % len(QUESTION_WORDS)])
    question = " ".join(words)
    requests, images = [], {}
    for i in range(n):
        rng = np.random.default_rng(i)
        pixels = rng.integers(0, 256, size=(image_size, image_size, 3), dtype=np.uint8)
        buffer = BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        sha = f"img{i}"
        images[sha] = buffer.getvalue()
        ref = ImageRef(sha256=sha, width=image_size, height=image_size)
        requests.append(
            InferenceRequest(
                request_id=f"r{i}",
                tenant_id=f"t{i % 4}",
                model="bench",
                messages=[Message(role="user", content=[ImagePart(ref), TextPart(question)])],
                sampling=SamplingParams(temperature=0.0, max_tokens=1_000_000, thinking=False),
            )
        )
    return requests, images


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_engine(runner, requests, images, *, new_tokens, prefills_per_step, max_seq_len):
    limited = [
        msgspec.structs.replace(
            r, sampling=msgspec.structs.replace(r.sampling, max_tokens=new_tokens)
        )
        for r in requests
    ]
    engine = Engine(
        runner,
        EngineConfig(
            max_batch_size=len(requests),
            max_seq_len=max_seq_len,
            prefills_per_step=prefills_per_step,
        ),
    )
    _sync(runner.device)
    t0 = time.perf_counter()
    for request in limited:
        engine.add_request(request, images)
    first, last, generated = {}, {}, {}
    while engine.has_unfinished():
        events = engine.step()
        now = time.perf_counter() - t0
        for rid, event in events:
            if isinstance(event, StartEvent):
                first[rid] = now
            elif isinstance(event, DoneEvent):
                last[rid] = now
                generated[rid] = event.usage.completion_tokens
    return _summary(first, last, generated, time.perf_counter() - t0)


class _FirstTokenTimer:
    """A generate() streamer noting when the first new tokens arrive (2nd ``put``)."""

    def __init__(self, device: torch.device, t0: float) -> None:
        self.device, self.t0, self.calls, self.first = device, t0, 0, None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:
            _sync(self.device)
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
    with_images = [p for p in prompts if p.pixel_values is not None]
    if with_images:
        out["pixel_values"] = torch.cat([p.pixel_values for p in with_images])
        out["image_grid_thw"] = torch.cat([p.image_grid_thw for p in with_images])
    return out


def _generate(runner, inputs, new_tokens, t0):
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
        )
    _sync(runner.device)
    return out.shape[1] - inputs["input_ids"].shape[1], timer.first


def run_naive(runner, requests, images, *, new_tokens, mode):
    """Prompt building (image decode + preprocessing) is inside the timing, as in the engine."""
    first, last, generated = {}, {}, {}
    _sync(runner.device)
    t0 = time.perf_counter()
    prepare = [lambda r=r: runner.prepare(r.messages, images, thinking=False) for r in requests]
    if mode == "batch":
        prompts = [p() for p in prepare]
        n, ttft = _generate(
            runner, _collate_left(prompts, runner.tokenizer.pad_token_id), new_tokens, t0
        )
        end = time.perf_counter() - t0
        for r in requests:
            first[r.request_id], last[r.request_id], generated[r.request_id] = ttft, end, n
    else:
        for r, p in zip(requests, prepare, strict=True):
            n, ttft = _generate(runner, p().model_inputs(), new_tokens, t0)
            first[r.request_id] = ttft
            last[r.request_id] = time.perf_counter() - t0
            generated[r.request_id] = n
    return _summary(first, last, generated, time.perf_counter() - t0)


def _summary(first, last, generated, wall):
    assert set(first) == set(last) == set(generated), "a request did not finish"
    ttft = list(first.values())
    return {
        "ttft_mean": statistics.mean(ttft),
        "ttft_max": max(ttft),
        "stream_tps": statistics.mean(generated[r] / last[r] for r in last),
        "total_tps": sum(generated.values()) / wall,
        "wall": wall,
        "tokens": sorted(set(generated.values())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: build the tiny model)")
    parser.add_argument("--full-size", action="store_true", help="random 10B GLM-4.6V on CUDA")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--image-size", type=int, default=672)
    parser.add_argument("--question-tokens", type=int, default=30)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefills-per-step", type=int, default=1)
    parser.add_argument("--naive", choices=["batch", "sequential"], default="batch")
    parser.add_argument(
        "--repeat", type=int, default=2, help="runs per measurement; the fastest is reported"
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory()
    tiny_dir = Path(tmp.name) / "tiny"
    if args.full_size or not args.model:
        build_tiny_model(tiny_dir, seed=0, train_steps=0)
    if args.full_size:
        runner = full_size_runner(tiny_dir, torch.device("cuda"))
    else:
        spec = {"path": args.model or str(tiny_dir), "dtype": args.dtype, "device": args.device}
        runner = ModelRunner.from_spec(spec)
    # Every request must run the full length: the engine sees no EOS ids.
    runner.special = dataclasses.replace(runner.special, eos_ids=frozenset())

    print(
        f"device={runner.device_name} dtype={str(runner.dtype).removeprefix('torch.')} "
        f"layers={runner.num_layers} image={args.image_size}px "
        f"question~{args.question_tokens} tokens new={args.new_tokens} naive={args.naive} "
        f"prefills/step={args.prefills_per_step} torch={torch.__version__} "
        f"threads={torch.get_num_threads()}"
    )
    requests, images = make_requests(
        max(args.concurrency), args.image_size, args.question_tokens, runner.tokenizer
    )
    prompt = runner.prepare(requests[0].messages, images, thinking=False)
    print(f"prompt tokens={prompt.length} (image tokens={prompt.image_tokens})")
    max_seq_len = prompt.length + args.new_tokens + 1
    # Warm-up: first calls pay lazy initialisation (kernels, allocator).
    run_engine(
        runner, requests[:2], images, new_tokens=4, prefills_per_step=2, max_seq_len=max_seq_len
    )
    run_naive(runner, requests[:1], images, new_tokens=4, mode="sequential")

    header = (
        f"{'streams':>7} | {'path':<6} | {'TTFT mean':>9} | {'TTFT max':>9} | "
        f"{'tok/s/stream':>12} | {'tok/s total':>11} | {'wall':>7}"
    )
    print(header)
    print("-" * len(header))
    for n in args.concurrency:
        batch = requests[:n]
        runs = [
            (
                run_engine(
                    runner,
                    batch,
                    images,
                    new_tokens=args.new_tokens,
                    prefills_per_step=args.prefills_per_step,
                    max_seq_len=max_seq_len,
                ),
                run_naive(runner, batch, images, new_tokens=args.new_tokens, mode=args.naive),
            )
            for _ in range(args.repeat)
        ]
        eng = min((r[0] for r in runs), key=lambda r: r["wall"])
        naive = min((r[1] for r in runs), key=lambda r: r["wall"])
        for name, r in (("engine", eng), ("naive", naive)):
            assert r["tokens"] == [args.new_tokens], r["tokens"]
            print(
                f"{n:>7} | {name:<6} | {r['ttft_mean'] * 1e3:>7.1f}ms | "
                f"{r['ttft_max'] * 1e3:>7.1f}ms | {r['stream_tps']:>12.1f} | "
                f"{r['total_tps']:>11.1f} | {r['wall']:>6.2f}s"
            )
        print(
            f"{n:>7} | ratio engine/naive: total tok/s x{eng['total_tps'] / naive['total_tps']:.2f}, "
            f"per-stream x{eng['stream_tps'] / naive['stream_tps']:.2f}, "
            f"TTFT mean x{eng['ttft_mean'] / naive['ttft_mean']:.2f}"
        )
    tmp.cleanup()


if __name__ == "__main__":
    main()
