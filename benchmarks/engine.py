"""Engine benchmarks: the engine against ``model.generate`` and its static-cache path.

Modes (``--mode``):

- ``suite``: every figure of the GPU-speed issue in one run, within ``--budget-s``: decode
  step by batch, one request alone end to end, time to first token (and by stage), requests/s
  with ``max(--concurrency)`` in flight, worker start to ready, the same figures for naive
  ``generate`` and for ``generate(cache_implementation="static")`` (transformers compiles its
  decode step; compile time reported apart), a profile of a decode step, and mixed-load
  inter-token latency. Each measurement is appended to ``--out``/engine-bench.jsonl as it is
  taken, and the Markdown tables go to ``--out``/engine-bench.md at the end;
- ``throughput``: TTFT and tokens/s at each ``--concurrency``, for ``--paths``;
- ``mixed``: inter-token latency of running streams while large requests arrive;
- ``render``: the Markdown of a recorded run (``--render RUN.jsonl``), optionally put into
  ``--docs docs/benchmarks.md`` between its markers.

The standard request and every definition: ``enginebench/workloads.py``.

CPU (tiny model, built into a temp dir):
    .venv/bin/python benchmarks/engine.py
    .venv/bin/python benchmarks/engine.py --mode mixed
GPU (random full-size GLM-4.6V-Flash, bf16, no download): ``scripts/device-bench.sh``, i.e.
    python3 benchmarks/engine.py --mode suite --full-size --out "$OUT" --budget-s 480
"""

from __future__ import annotations

import time

PROCESS_STARTED = time.monotonic()  # the suite's time budget counts from here

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from enginebench import generate, models, record, report, startup, workloads  # noqa: E402
from enginebench.mixed import run_mixed  # noqa: E402
from enginebench.suite import best, mixed_settings, suite  # noqa: E402

from inference.engine import Engine, EngineConfig  # noqa: E402
from inference.engine.runner import ModelRunner  # noqa: E402


# ---------------------------------------------------------------------------- other modes
def throughput(args: argparse.Namespace, runner: ModelRunner) -> None:
    text = workloads.question(runner.tokenizer, args.question_tokens)
    requests, images = workloads.make_requests(
        max(args.concurrency), args.image_size, text, args.new_tokens
    )
    prompt = runner.prepare(requests[0].messages, images, thinking=False)
    print(f"prompt tokens={prompt.length} (image tokens={prompt.image_tokens})")
    engine = Engine(runner, _config(args, max_batch_size=max(args.concurrency)))
    print(f"engine warm-up {engine.warmup():.2f}s ({len(engine.decoder.shapes)} decode shapes)")
    static = {"cache_implementation": "static"}
    paths = {
        "engine": lambda batch, tag: workloads.run_engine(engine, batch, images, tag=tag),
        "naive": lambda batch, tag: generate.run_generate(
            runner, batch, images, new_tokens=args.new_tokens, mode=args.naive
        ),
        "static": lambda batch, tag: generate.run_generate(
            runner, batch, images, new_tokens=args.new_tokens, mode=args.naive, extra=static
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
        fastest = {name: best(results) for name, results in runs.items()}
        for name, r in fastest.items():
            assert r["tokens"] == [args.new_tokens], (name, r["tokens"])
            print(
                f"{n:>7} | {name:<6} | {r['ttft_mean'] * 1e3:>7.1f}ms | "
                f"{r['ttft_max'] * 1e3:>7.1f}ms | {r['stream_tps']:>12.1f} | "
                f"{r['total_tps']:>11.1f} | {r['wall']:>6.2f}s"
            )
        if "engine" in fastest and "naive" in fastest:
            eng, naive = fastest["engine"], fastest["naive"]
            print(
                f"{n:>7} | ratio engine/naive: total tok/s "
                f"x{eng['total_tps'] / naive['total_tps']:.2f}, per-stream "
                f"x{eng['stream_tps'] / naive['stream_tps']:.2f}, TTFT mean "
                f"x{eng['ttft_mean'] / naive['ttft_mean']:.2f}"
            )
    engine.close()


def mixed(args: argparse.Namespace, runner: ModelRunner) -> None:
    what = f"a {args.large_image}px image" if args.large_kind == "image" else "a long text"
    print(
        f"mixed load: {args.streams} running streams; {args.large_count} requests with "
        f"{what}, one every {args.large_every} steps"
    )
    header = (
        f"{'budget':>10} | {'ITL before p50':>14} | {'ITL p50':>8} | {'ITL p99':>8} | "
        f"{'ITL max':>8} | {'large TTFT mean':>15} | {'large TTFT max':>14}"
    )
    printed = False
    for budget in args.mixed_budgets:
        config = _config(args, **mixed_settings(budget))
        runs = [
            run_mixed(
                runner,
                config=config,
                streams=args.streams,
                size=args.large_image,
                count=args.large_count,
                every=args.large_every,
                kind=args.large_kind,
                question_tokens=args.question_tokens,
            )
            for _ in range(args.repeat)
        ]
        r = min(runs, key=lambda run: run["p99"])
        if not printed:
            print(f"large prompt tokens={r['large_prompt']}")
            print(header)
            print("-" * len(header))
            printed = True
        print(
            f"{budget:>10} | {r['before_p50'] * 1e3:>12.1f}ms | {r['p50'] * 1e3:>6.1f}ms | "
            f"{r['p99'] * 1e3:>6.1f}ms | {r['max'] * 1e3:>6.1f}ms | "
            f"{r['ttft_mean'] * 1e3:>13.1f}ms | {r['ttft_max'] * 1e3:>12.1f}ms"
        )


def _config(args: argparse.Namespace, **changes: object) -> EngineConfig:
    """The engine's defaults with the command line's prefill and image-thread settings."""
    values: dict[str, object] = {"preprocess_threads": args.preprocess_threads}
    if args.prefill_budget is not None:
        values["prefill_budget_tokens"] = args.prefill_budget
    if args.chunk_vision is not None:
        values["chunk_vision"] = args.chunk_vision == "on"
    values.update(changes)
    return EngineConfig(**values)  # type: ignore[arg-type]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--mode",
        choices=["throughput", "mixed", "suite", "render", "startup-child"],
        default="throughput",
    )
    parser.add_argument("--model", help="checkpoint folder (default: build the tiny model)")
    parser.add_argument("--full-size", action="store_true", help="random 10B GLM-4.6V on CUDA")
    parser.add_argument("--layers", type=int, help="--full-size with fewer layers (smoke tests)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--paths", nargs="+", default=["engine", "naive"])
    parser.add_argument("--image-size", type=int, default=672)
    parser.add_argument("--question-tokens", type=int, default=30)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--prefill-budget", type=int, help="prefill_budget_tokens (default: the engine's)"
    )
    parser.add_argument(
        "--chunk-vision", choices=["on", "off"], help="spread vision passes over steps"
    )
    parser.add_argument(
        "--preprocess-threads", type=int, help="engine image threads (default: its own)"
    )
    parser.add_argument("--naive", choices=["batch", "sequential"], default="batch")
    parser.add_argument("--streams", type=int, default=8, help="mixed: running streams")
    parser.add_argument("--large-image", type=int, default=2016, help="mixed: image px")
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
    # suite
    parser.add_argument("--out", help="suite: folder for engine-bench.jsonl/.md and profiles")
    parser.add_argument("--budget-s", type=float, help="suite: stop starting stages after this")
    parser.add_argument("--steps", type=int, default=50, help="suite: timed decode steps")
    parser.add_argument("--sustained-requests", type=int, help="suite: default 5 x in flight")
    parser.add_argument(
        "--sustained", type=int, nargs="*", default=[32, 128], help="suite: closed loops"
    )
    parser.add_argument(
        "--batches", type=int, nargs="+", default=[1, 8, 32, 128], help="suite: decode steps"
    )
    parser.add_argument(
        "--variants",
        nargs="*",
        default=["flex:compiled", "grouped:eager"],
        help="suite: other decode kernels, ATTENTION:compiled|eager",
    )
    parser.add_argument("--images", type=int, default=64, help="suite: distinct images")
    parser.add_argument("--static-batches", type=int, nargs="*", default=[32])
    parser.add_argument("--mixed-sizes", type=int, nargs="*", default=[2016])
    parser.add_argument(
        "--mixed-budgets",
        nargs="*",
        default=["1024", "2048", "4096", "off"],
        help="mixed: prefill budgets in tokens, or off (no chunking)",
    )
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        help="suite: check kernels variants engine naive static startup mixed profile",
    )
    parser.add_argument("--scratch", help="suite: where the start-to-ready checkpoint is saved")
    # startup-child
    parser.add_argument("--compile-cache-dir", help="startup-child: inductor cache folder")
    # render
    parser.add_argument(
        "--render", nargs="+", help="render: recorded engine-bench.jsonl files (of one device)"
    )
    parser.add_argument("--docs", help="render: Markdown file whose marked section to replace")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    args.process_started = PROCESS_STARTED
    if args.mode == "startup-child":
        startup.child_main(args.model, device=args.device, compile_cache_dir=args.compile_cache_dir)
        return
    if args.mode == "render":
        markdown = report.render([r for path in args.render for r in record.load(Path(path))])
        if args.docs:
            report.replace_section(Path(args.docs), markdown)
        print(markdown)
        return
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tiny_dir = Path(tmp) / "tiny"
        if args.full_size or not args.model:
            models.build_tiny(tiny_dir)
        if args.mode == "suite":
            suite(args, tiny_dir)
            return
        runner = models.without_eos(models.runner_from_args(args, tiny_dir))
        print(
            f"device={runner.device_name} dtype={str(runner.dtype).removeprefix('torch.')} "
            f"layers={runner.num_layers} image={args.image_size}px "
            f"question~{args.question_tokens} tokens new={args.new_tokens} naive={args.naive} "
            f"prefill_budget={args.prefill_budget} chunk_vision={args.chunk_vision} "
            f"preprocess_threads={args.preprocess_threads} torch={torch.__version__} "
            f"threads={torch.get_num_threads()}"
        )
        if args.mode == "mixed":
            mixed(args, runner)
        else:
            throughput(args, runner)


if __name__ == "__main__":
    main()
