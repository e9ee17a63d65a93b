"""Engine benchmarks: throughput against ``model.generate``, and latency under mixed load.

``--mode throughput`` (default): time to first token and tokens/s at 1, 8, 32 streams.
Standard request: one 672x672 image + a ~30-token question, 64 new tokens, greedy. EOS is
disabled on every path (engine: no EOS ids; generate: ``min_new_tokens``) so every request
generates exactly ``--new-tokens``. Paths (``--paths``):

- ``engine``: all requests submitted at t=0, ``step()`` until done (continuous batching,
  chunked prefill, decode padded to batch buckets; on CUDA one CUDA graph per decode shape,
  captured by ``Engine.warmup()`` before timing, its duration printed);
- ``naive``: ``model.generate`` on the same requests, all at once as one left-padded batch
  (``--naive batch``, default; what shared/notes/glm4v.md measured) or one after the other
  (``--naive sequential``);
- ``static``: the same ``generate`` with ``cache_implementation="static"`` (transformers
  compiles its decode step); one untimed run per batch size first pays the compilation.

Definitions: TTFT = submit -> first token sampled (mean and max over requests); per-stream
tokens/s = mean over requests of new tokens / (submit -> last token); total tokens/s =
all new tokens / wall time. Each figure is the fastest of ``--repeat`` runs (shared machines
are noisy); the paths alternate.

``--mode mixed``: inter-token latency of running streams while large-image requests arrive.
``--streams`` text streams decode; once they all stream, one ``--large-image`` px request
arrives every ``--large-every`` steps until ``--large-count`` have come (``--large-kind
text``: a text prompt of as many tokens instead, to see the prefill without the vision pass,
which chunking cannot split). Reported: p50/p99/max
of the gaps between consecutive tokens of the running streams from the first arrival to the
last large request's first token, the same before any arrival (the plain decode step), and
the large requests' TTFT; once with ``prefill_chunk_tokens=--chunk`` and once unchunked.

CPU (tiny model, built into a temp dir):
    .venv/bin/python benchmarks/engine.py
    .venv/bin/python benchmarks/engine.py --mode mixed
GPU (random full-size GLM-4.6V-Flash, bf16, no download):
    .venv/bin/python benchmarks/engine.py --full-size --paths engine naive static
    .venv/bin/python benchmarks/engine.py --full-size --mode mixed --large-image 2016
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


def _question(tokenizer: Any, tokens: int) -> str:
    """The fewest whole words of ``QUESTION_WORDS`` (repeated) making ``tokens`` tokens."""

    def count(n: int) -> int:
        text = " ".join(QUESTION_WORDS[i % len(QUESTION_WORDS)] for i in range(n))
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    low, high = 0, 1
    while count(high) < tokens:
        low, high = high, high * 2
    while low + 1 < high:  # count(low) < tokens <= count(high)
        middle = (low + high) // 2
        low, high = (middle, high) if count(middle) < tokens else (low, middle)
    return " ".join(QUESTION_WORDS[i % len(QUESTION_WORDS)] for i in range(high))


def _png(size: int, seed: int) -> bytes:
    from io import BytesIO

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buffer = BytesIO()
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_request(
    rid: str, question: str, *, image: tuple[str, int] | None, max_tokens: int
) -> InferenceRequest:
    parts: list[Any] = [TextPart(question)]
    if image is not None:
        parts.insert(0, ImagePart(ImageRef(sha256=image[0], width=image[1], height=image[1])))
    return InferenceRequest(
        request_id=rid,
        tenant_id=f"t{hash(rid) % 4}",
        model="bench",
        messages=[Message(role="user", content=parts)],
        sampling=SamplingParams(temperature=0.0, max_tokens=max_tokens, thinking=False),
    )


def make_requests(n: int, image_size: int, question: str, new_tokens: int):
    """``n`` requests, each with its own image (no image-cache hits between them)."""
    images = {f"img{i}": _png(image_size, i) for i in range(n)}
    requests = [
        make_request(f"r{i}", question, image=(f"img{i}", image_size), max_tokens=new_tokens)
        for i in range(n)
    ]
    return requests, images


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_engine(engine: Engine, requests, images, *, tag: str):
    """One timed batch on a warm, idle engine. Request ids get ``tag`` (ids must not repeat
    while running, and the image cache is cleared so every run pays its vision passes)."""
    engine.image_cache.clear()
    _sync(engine.runner.device)
    t0 = time.perf_counter()
    for request in requests:
        engine.add_request(
            msgspec.structs.replace(request, request_id=f"{request.request_id}-{tag}"), images
        )
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


def _generate(runner, inputs, new_tokens, t0, extra):
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
    _sync(runner.device)
    return out.shape[1] - inputs["input_ids"].shape[1], timer.first


def run_generate(runner, requests, images, *, new_tokens, mode, extra=None):
    """Prompt building (image decode + preprocessing) is inside the timing, as in the engine."""
    extra = extra or {}
    first, last, generated = {}, {}, {}
    _sync(runner.device)
    t0 = time.perf_counter()
    prepare = [lambda r=r: runner.prepare(r.messages, images, thinking=False) for r in requests]
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


def throughput(runner: ModelRunner, args: argparse.Namespace) -> None:
    question = _question(runner.tokenizer, args.question_tokens)
    requests, images = make_requests(
        max(args.concurrency), args.image_size, question, args.new_tokens
    )
    prompt = runner.prepare(requests[0].messages, images, thinking=False)
    print(f"prompt tokens={prompt.length} (image tokens={prompt.image_tokens})")
    engine = Engine(
        runner,
        EngineConfig(
            max_batch_size=max(args.concurrency),
            max_seq_len=prompt.length + args.new_tokens,
            prefills_per_step=args.prefills_per_step,
            prefill_chunk_tokens=args.chunk,
            preprocess_threads=args.preprocess_threads,
        ),
    )
    print(f"engine warm-up {engine.warmup():.2f}s ({len(engine.decoder.shapes)} decode shapes)")
    paths = {
        "engine": lambda batch, tag: run_engine(engine, batch, images, tag=tag),
        "naive": lambda batch, tag: run_generate(
            runner, batch, images, new_tokens=args.new_tokens, mode=args.naive
        ),
        "static": lambda batch, tag: run_generate(
            runner,
            batch,
            images,
            new_tokens=args.new_tokens,
            mode=args.naive,
            extra={"cache_implementation": "static"},
        ),
    }
    paths = {name: paths[name] for name in args.paths}
    header = (
        f"{'streams':>7} | {'path':<6} | {'TTFT mean':>9} | {'TTFT max':>9} | "
        f"{'tok/s/stream':>12} | {'tok/s total':>11} | {'wall':>7}"
    )
    print(header)
    print("-" * len(header))
    for n in args.concurrency:
        batch = requests[:n]
        if "static" in paths:  # compiles for this batch shape; not timed
            started = time.perf_counter()
            paths["static"](batch, "compile")
            print(f"{n:>7} | static warm-up (compile) {time.perf_counter() - started:.1f}s")
        runs: dict[str, list[dict]] = {name: [] for name in paths}
        for repeat in range(args.repeat):
            for name, run in paths.items():
                runs[name].append(run(batch, f"{n}-{repeat}"))
        best = {name: min(results, key=lambda r: r["wall"]) for name, results in runs.items()}
        for name, r in best.items():
            assert r["tokens"] == [args.new_tokens], (name, r["tokens"])
            print(
                f"{n:>7} | {name:<6} | {r['ttft_mean'] * 1e3:>7.1f}ms | "
                f"{r['ttft_max'] * 1e3:>7.1f}ms | {r['stream_tps']:>12.1f} | "
                f"{r['total_tps']:>11.1f} | {r['wall']:>6.2f}s"
            )
        if "engine" in best and "naive" in best:
            eng, naive = best["engine"], best["naive"]
            print(
                f"{n:>7} | ratio engine/naive: total tok/s "
                f"x{eng['total_tps'] / naive['total_tps']:.2f}, per-stream "
                f"x{eng['stream_tps'] / naive['stream_tps']:.2f}, TTFT mean "
                f"x{eng['ttft_mean'] / naive['ttft_mean']:.2f}"
            )


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_mixed(runner: ModelRunner, args: argparse.Namespace, chunk: int | None) -> dict:
    """Background streams decode while large-image requests arrive (see module doc)."""
    question = _question(runner.tokenizer, args.question_tokens)
    large_size, large_new = args.large_image, 8
    if args.large_kind == "image":
        images = {f"big{i}": _png(large_size, 100 + i) for i in range(args.large_count)}
        large = [
            make_request(f"big{i}", question, image=(f"big{i}", large_size), max_tokens=large_new)
            for i in range(args.large_count)
        ]
    else:  # as many text tokens as the image would give: no vision pass, only prefill
        images = {}
        text = _question(runner.tokenizer, (large_size // 28) ** 2)
        large = [
            make_request(f"big{i}", f"{i} {text}", image=None, max_tokens=large_new)
            for i in range(args.large_count)
        ]
    large_len = runner.prepare(large[0].messages, images, thinking=False).length
    max_seq_len = max(large_len + large_new, 2048)
    stream_len = runner.prepare(
        make_request("s", question, image=None, max_tokens=1).messages, {}, thinking=False
    ).length
    stamps: dict[str, list[float]] = {}
    engine = Engine(
        runner,
        EngineConfig(
            max_batch_size=args.streams + args.large_count,
            max_seq_len=max_seq_len,
            prefill_chunk_tokens=chunk,
            preprocess_threads=args.preprocess_threads,
            token_observer=lambda rid, tok: stamps.setdefault(rid, []).append(time.perf_counter()),
        ),
    )
    engine.warmup()
    streams = [f"s{i}" for i in range(args.streams)]
    for rid in streams:
        engine.add_request(
            make_request(rid, question, image=None, max_tokens=max_seq_len - stream_len), {}
        )
    while not all(rid in stamps for rid in streams):
        engine.step()
    for _ in range(5):  # steady state: the plain decode step
        engine.step()
    _sync(runner.device)
    arrivals: dict[str, float] = {}
    step = 0
    while len(arrivals) < len(large) or not all(r.request_id in stamps for r in large):
        if len(arrivals) < len(large) and step % args.large_every == 0:
            request = large[len(arrivals)]
            arrivals[request.request_id] = time.perf_counter()
            engine.add_request(request, images)
        engine.step()
        step += 1
    _sync(runner.device)
    window = (min(arrivals.values()), max(stamps[r.request_id][0] for r in large))
    before, during = [], []
    for rid in streams:
        gaps = zip(stamps[rid], stamps[rid][1:], strict=False)
        for a, b in gaps:
            if b <= window[0]:
                before.append(b - a)
            elif a >= window[0] and b <= window[1] + 1e-9:
                during.append(b - a)
    for rid in streams:
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    engine.close()
    ttft = [stamps[r.request_id][0] - arrivals[r.request_id] for r in large]
    return {
        "large_prompt": large_len,
        "before_p50": _percentile(before, 0.5),
        "p50": _percentile(during, 0.5),
        "p99": _percentile(during, 0.99),
        "max": max(during),
        "ttft_mean": statistics.mean(ttft),
        "ttft_max": max(ttft),
    }


def mixed(runner: ModelRunner, args: argparse.Namespace) -> None:
    what = f"a {args.large_image}px image" if args.large_kind == "image" else "a long text"
    print(
        f"mixed load: {args.streams} running streams; {args.large_count} requests with "
        f"{what}, one every {args.large_every} steps"
    )
    header = (
        f"{'prefill chunk':>13} | {'ITL before p50':>14} | {'ITL p50':>8} | {'ITL p99':>8} | "
        f"{'ITL max':>8} | {'large TTFT mean':>15} | {'large TTFT max':>14}"
    )
    printed = False
    for chunk in (args.chunk, None):
        runs = [run_mixed(runner, args, chunk) for _ in range(args.repeat)]
        r = min(runs, key=lambda run: run["p99"])
        if not printed:
            print(f"large prompt tokens={r['large_prompt']}")
            print(header)
            print("-" * len(header))
            printed = True
        print(
            f"{chunk or 'off':>13} | {r['before_p50'] * 1e3:>12.1f}ms | {r['p50'] * 1e3:>6.1f}ms | "
            f"{r['p99'] * 1e3:>6.1f}ms | {r['max'] * 1e3:>6.1f}ms | "
            f"{r['ttft_mean'] * 1e3:>13.1f}ms | {r['ttft_max'] * 1e3:>12.1f}ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=["throughput", "mixed"], default="throughput")
    parser.add_argument("--model", help="checkpoint folder (default: build the tiny model)")
    parser.add_argument("--full-size", action="store_true", help="random 10B GLM-4.6V on CUDA")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--paths", nargs="+", default=["engine", "naive"])
    parser.add_argument("--image-size", type=int, default=672)
    parser.add_argument("--question-tokens", type=int, default=30)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefills-per-step", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=1024, help="prefill_chunk_tokens")
    parser.add_argument(
        "--preprocess-threads", type=int, help="engine image threads (default: its own)"
    )
    parser.add_argument("--naive", choices=["batch", "sequential"], default="batch")
    parser.add_argument("--streams", type=int, default=8, help="mixed: running streams")
    parser.add_argument("--large-image", type=int, default=1344, help="mixed: image px")
    parser.add_argument("--large-count", type=int, default=4)
    parser.add_argument(
        "--large-kind",
        choices=["image", "text"],
        default="image",
        help="mixed: large requests carry an image, or as many text tokens (no vision pass)",
    )
    parser.add_argument("--large-every", type=int, default=10, help="mixed: steps apart")
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
        f"prefills/step={args.prefills_per_step} chunk={args.chunk} "
        f"preprocess_threads={args.preprocess_threads} torch={torch.__version__} "
        f"threads={torch.get_num_threads()}"
    )
    if args.mode == "mixed":
        mixed(runner, args)
    else:
        throughput(runner, args)
    tmp.cleanup()


if __name__ == "__main__":
    main()
