"""The GPU-speed issues' figures in one budgeted run (``benchmarks/engine.py --mode suite``).

Stages, in this order (``--skip`` leaves some to another call; a stage that no longer fits
``--budget-s``, counted from the process start, is recorded as skipped; one that fails is
recorded as an error and the run goes on):

1. ``check``: the fast paths (vision pass, packed prefill, the default decode step) against
   the model's own forward for the standard request (relative errors);
2. ``kernels``: the vision tower and the text prefill of the standard request, ours and the
   model's own, a large image's vision pass, and packed prefills of several prompts;
3. ``variants``: engines with other decode kernels (``--variants``, e.g. ``flex:compiled``,
   ``grouped:eager``): the decode step by batch and an engine step at the largest batch,
   each after its own agreement check, so the defaults are chosen from measurements;
4. ``engine``: the engine at its defaults (as a worker runs it; on CUDA every decode shape
   compiled and captured): decode step by batch, engine step by batch, one request alone,
   TTFT by stage, requests submitted at once (``--concurrency``), closed loops
   (``--sustained``);
5. ``naive``: ``model.generate`` (one left-padded batch per ``--concurrency``);
6. ``static``: ``generate(cache_implementation="static")``, its compile run timed apart,
   per ``--static-batches``;
7. ``startup``: worker start to ready in fresh processes (the random model saved first),
   with an empty compile cache (cold), then with the cache the first one left (warm);
8. ``mixed``: inter-token latency of running streams while large images arrive, per
   ``--mixed-budgets`` (a prefill budget in tokens, or ``off``: no chunking at all);
9. last, ``profile``: a decode step of the stage-4 engine (starting the CUDA profiler after
   graph capture has broken CUDA contexts on some versions: nothing comes after it).

Every engine here runs with the image-embedding cache off: the requests reuse a pool of
``--images`` distinct images, and each must still pay its own vision pass.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from inference.engine import Engine, EngineConfig

from . import generate, kernels, models, record, report, startup, workloads
from .mixed import run_mixed
from .profiling import decode_profile, ttft_stages

# Rough seconds per stage on an H200 with the full-size model (for the time budget).
GPU_ESTIMATES = {
    "check": 10,
    "kernels": 15,
    "variant": 70,  # per variant: compile (once per kernel), capture, steps
    "engine build": 60,  # compile the decode layer, capture every shape
    "decode steps": 10,
    "engine steps": 15,
    "engine alone": 3,
    "ttft stages": 2,
    "engine batches": 10,
    "sustained": 25,  # per closed loop
    "profile": 15,
    "naive": 30,
    "startup": 150,  # save the checkpoint, then a cold and a warm start
    "static": 120,  # per batch size: transformers compiles its decode step for each
    "mixed": 12,  # per budget
}
STAGES = ("check", "kernels", "variants", "engine", "naive", "static", "startup", "mixed")


def best(results: list[dict], key: str = "wall") -> dict:
    return min(results, key=lambda r: r[key])


def _free_bytes(path: str) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse_variant(text: str) -> dict[str, Any]:
    """``attention:compiled`` or ``attention:eager`` -> EngineConfig fields."""
    attention, _, mode = text.partition(":")
    if mode not in ("compiled", "eager"):
        raise ValueError(f"variant {text!r}: use ATTENTION:compiled or ATTENTION:eager")
    return {"decode_attention": attention, "compile_decode": mode == "compiled"}


# ---------------------------------------------------------------------------- suite
def suite(args: argparse.Namespace, tiny_dir: Path) -> None:
    """Run every stage that fits; records to ``--out``, Markdown printed at the end."""
    out = Path(args.out) if args.out else None
    rec = record.Recorder(out, args.budget_s, started=args.process_started)
    estimate = GPU_ESTIMATES if args.full_size else dict.fromkeys(GPU_ESTIMATES, 0)
    built = time.perf_counter()
    runner = models.without_eos(models.runner_from_args(args, tiny_dir))
    build_s = time.perf_counter() - built
    cuda = runner.device.type == "cuda"
    text = workloads.question(runner.tokenizer, args.question_tokens)
    closed = [n for n in args.sustained if n > 0]
    top = max([*args.concurrency, *closed, *args.batches])
    n_requests = max(top, *(args.sustained_requests or 5 * n for n in closed or [0]))
    requests, images = workloads.make_requests(
        n_requests, args.image_size, text, args.new_tokens, distinct=args.images
    )
    prompt = runner.prepare(requests[0].messages, images, thinking=False)
    import transformers

    rec.add(
        "meta",
        device=runner.device_name,
        device_type=runner.device.type,
        torch=torch.__version__,
        transformers=transformers.__version__,
        model="random full-size GLM-4.6V-Flash" if args.full_size else (args.model or "tiny"),
        dtype=str(runner.dtype).removeprefix("torch."),
        layers=runner.num_layers,
        prompt_tokens=prompt.length,
        image_tokens=prompt.image_tokens,
        new_tokens=args.new_tokens,
        model_build_s=build_s,
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        commit=_commit(),
        command=" ".join(["python3", *sys.argv]),
    )
    print(f"model ready in {build_s:.1f}s; prompt {prompt.length} tokens", flush=True)
    position = prompt.length + 32  # where the timed decode steps write

    def engine_config(**changes: Any) -> EngineConfig:
        """The defaults a worker runs with, but the batch limit this run needs, the image
        cache off and the command line's prefill settings."""
        values: dict[str, Any] = {
            "max_batch_size": max(top, EngineConfig().max_batch_size or 0) if cuda else top,
            "image_cache_bytes": 0,
            "preprocess_threads": args.preprocess_threads,
        }
        if args.prefill_budget is not None:
            values["prefill_budget_tokens"] = args.prefill_budget
        if args.chunk_vision is not None:
            values["chunk_vision"] = args.chunk_vision == "on"
        if not cuda:  # the tiny model's CPU run keeps the KV small
            values["max_seq_len"] = max(2048, prompt.length + args.new_tokens + 64)
        values.update(changes)
        return EngineConfig(**values)

    def build_engine(**changes: Any) -> tuple[Engine, float]:
        engine = Engine(runner, engine_config(**changes))
        return engine, engine.warmup()

    def step_times(
        engine: Engine, variant: str, batches: list[int], engine_batches: list[int]
    ) -> None:
        for b in batches:
            t = workloads.decoder_step_times(engine, batch=b, position=position, repeats=args.steps)
            rec.add(
                "decoder_step",
                variant=variant,
                batch=b,
                wall_median_s=statistics.median(t["wall"]),
                device_median_s=statistics.median(t["device"]) if t["device"] else None,
            )
        for b in engine_batches:
            t = workloads.engine_step_times(
                engine, requests[:b], images, steps=args.steps, tag=f"{variant}{b}"
            )
            rec.add(
                "engine_step",
                variant=variant,
                batch=b,
                median_s=statistics.median(t),
                p90_s=workloads.percentile(t, 0.9),
            )

    reference: dict[str, Any] = {}

    def agreement(engine: Engine, variant: str) -> None:
        result, reference["value"] = kernels.fast_path_check(
            engine, requests[0], images, reference.get("value")
        )
        rec.add("check", variant=variant, **result)

    engines: list[Engine] = []

    def main_engine() -> Engine:
        return engines[0]

    def default_engine() -> None:
        """The engine at its defaults, warmed. If its warm-up fails (on CUDA: the graph
        capture), once more without CUDA graphs, so that the other figures still come."""
        try:
            engine, warmup_s = build_engine()
        except Exception as exc:
            if not cuda:
                raise
            rec.add("error", what="engine build", message=f"{type(exc).__name__}: {exc}")
            torch.cuda.empty_cache()
            engine, warmup_s = build_engine(cuda_graphs=False)
        stats = engine.stats()
        rec.add(
            "engine_build",
            warmup_s=warmup_s,
            shapes=len(engine.decoder.shapes),
            graphs=stats.cuda_graphs,
            slots=stats.kv_capacity_tokens // engine.config.max_seq_len,
            max_seq_len=engine.config.max_seq_len,
            batch_buckets=list(stats.decode_batch_sizes),
            compiled_buckets=list(stats.compiled_batch_sizes),
            compile_error=stats.compile_error,
            attention=engine.config.decode_attention,
            prefill_budget=engine.config.prefill_budget_tokens,
            chunk_vision=engine.config.chunk_vision,
        )
        engines.append(engine)

    def engine_runs(n: int) -> None:
        """``n`` requests submitted at once, the fastest of ``--repeat`` runs."""
        runs = [
            workloads.run_engine(main_engine(), requests[:n], images, tag=f"b{n}-{i}")
            for i in range(args.repeat)
        ]
        rec.add("run", path="engine", streams=n, **best(runs))

    def stages() -> None:
        rec.add("ttft_stages", stages=ttft_stages(main_engine(), requests[0], images))

    def sustained(concurrency: int) -> None:
        count = args.sustained_requests or 5 * concurrency
        result = workloads.run_sustained(
            main_engine(), requests[:count], images, concurrency=concurrency, tag=f"s{concurrency}"
        )
        rec.add("sustained", **result)

    def profile() -> None:
        table = out / "profile-decode.txt" if out else None
        batch = 32 if top >= 32 else top
        result = decode_profile(
            main_engine(),
            requests[:batch],
            images,
            steps=min(args.steps, 20),
            tag="prof",
            table_path=table,
        )
        rec.add("profile", **result)

    def check() -> None:
        sizes = ((1000, 750), (57, 93), (2016, 1512))
        rec.add("pixel_check", sizes=sizes, **kernels.pixel_check(runner, sizes))
        engine, _ = build_engine(max_batch_size=1, capture_sampling=False)
        agreement(engine, "default")
        engine.close()

    def kernel_timings() -> None:
        rec.add(
            "kernels",
            **kernels.prefill_timings(
                runner, requests[0], images, large_size=args.large_image, repeats=args.repeat + 3
            ),
        )

    def variants() -> None:
        for name in args.variants:
            if not rec.allows(f"variant {name}", estimate["variant"]):
                continue
            started = time.perf_counter()
            engine, warmup_s = build_engine(capture_sampling=False, **parse_variant(name))
            stats = engine.stats()
            rec.add(
                "variant_build",
                variant=name,
                warmup_s=warmup_s,
                seconds=time.perf_counter() - started,
                compiled_buckets=list(stats.compiled_batch_sizes),
                compile_error=stats.compile_error,
            )
            agreement(engine, name)
            step_times(engine, name, list(args.batches), [max(args.batches)])
            engine.close()
            del engine
            gc.collect()  # the engine's graphs and KV buffers, before the next one allocates
            if cuda:
                torch.cuda.empty_cache()

    def naive() -> None:
        for n in args.concurrency:
            runs = [
                generate.run_generate(runner, requests[:n], images, new_tokens=args.new_tokens)
                for _ in range(args.repeat)
            ]
            rec.add("run", path="naive", streams=n, **best(runs))

    def start_to_ready() -> None:
        scratch_dir = args.scratch
        if args.full_size:
            need = 1.2 * sum(p.nbytes for p in runner.model.parameters())
            roomy = [d for d in (args.scratch, "/dev/shm") if d and _free_bytes(d) > need]
            if not roomy:
                raise RuntimeError(f"no scratch space for a {need / 2**30:.0f} GiB checkpoint")
            scratch_dir = roomy[0]
        with tempfile.TemporaryDirectory(prefix="bench-ckpt-", dir=scratch_dir) as scratch:
            saved = time.perf_counter()
            checkpoint = (
                models.save_checkpoint(runner, tiny_dir, Path(scratch) / "model")
                if args.full_size
                else Path(args.model or tiny_dir)
            )
            save_s = time.perf_counter() - saved
            compile_cache = Path(scratch) / "compile-cache"
            # Just written, so the weights load from the page cache: a warm-disk start. A
            # serving configuration: the engine's defaults (batch limit, context per slot).
            for cache_state in ("cold", "warm"):
                if not rec.allows(f"startup {cache_state}", estimate["startup"] / 3):
                    continue
                result = startup.measure_startup(
                    checkpoint,
                    device=str(runner.device),
                    compile_cache_dir=str(compile_cache),
                    timeout_s=max(60.0, (args.budget_s or 3600) - rec.elapsed),
                )
                rec.add("startup", save_s=save_s, compile_cache=cache_state, **result)

    def static() -> None:
        extra = {"cache_implementation": "static"}
        for n in [n for n in args.static_batches if n <= top]:
            if not rec.allows(f"static batch {n}", estimate["static"]):
                continue
            started = time.perf_counter()
            generate.run_generate(
                runner, requests[:n], images, new_tokens=args.new_tokens, extra=extra
            )
            rec.add("static_compile", batch=n, seconds=time.perf_counter() - started)
            runs = [
                generate.run_generate(
                    runner, requests[:n], images, new_tokens=args.new_tokens, extra=extra
                )
                for _ in range(args.repeat)
            ]
            rec.add("run", path="static", streams=n, **best(runs))

    def mixed() -> None:
        for size in args.mixed_sizes:
            for budget in args.mixed_budgets:
                if not rec.allows(f"mixed {size}px budget={budget}", estimate["mixed"]):
                    continue
                result = run_mixed(
                    runner,
                    config=engine_config(
                        **mixed_settings(budget), capture_sampling=False, max_batch_size=None
                    ),
                    size=size,
                    streams=args.streams,
                    count=args.large_count,
                    question_tokens=args.question_tokens,
                )
                rec.add("mixed", budget=budget, **result)

    engine_plan = [
        ("decode steps", lambda: step_times(main_engine(), "default", list(args.batches), [])),
        ("engine steps", lambda: step_times(main_engine(), "default", [], list(args.batches))),
        ("engine alone", lambda: engine_runs(1)),
        ("ttft stages", stages),
        ("engine batches", lambda: [engine_runs(n) for n in args.concurrency if n > 1]),
        *((f"sustained {n}", lambda n=n: sustained(n)) for n in closed),
    ]
    plan = [
        ("check", check, estimate["check"]),
        ("kernels", kernel_timings, estimate["kernels"]),
        ("variants", variants, 0),  # checks the budget before each variant
    ]
    for name, fn, cost in plan:
        if name in args.skip:
            rec.add("skipped", what=name, reason="--skip")
        else:
            rec.stage(name, cost, fn)
            if cuda:
                torch.cuda.empty_cache()
    if "engine" in args.skip:
        rec.add("skipped", what="engine", reason="--skip")
    elif rec.stage("engine build", estimate["engine build"], default_engine):
        for name, fn in engine_plan:
            key = "sustained" if name.startswith("sustained") else name
            rec.stage(name, estimate[key], fn)
    later = [("naive", naive), ("static", static), ("startup", start_to_ready), ("mixed", mixed)]
    for name, fn in later:
        if name in args.skip:
            rec.add("skipped", what=name, reason="--skip")
            continue
        # static, startup and mixed check the budget before each of their runs
        rec.stage(name, estimate[name] if name == "naive" else 0, fn)
        if cuda:
            torch.cuda.empty_cache()
    if engines:
        if "profile" in args.skip:
            rec.add("skipped", what="profile", reason="--skip")
        else:
            rec.stage("profile", estimate["profile"], profile)
        engines[0].close()
    rec.close()
    markdown = report.render(rec.records)
    if out is not None:
        (out / "engine-bench.md").write_text(markdown)
    print(markdown, flush=True)


def mixed_settings(budget: str) -> dict[str, Any]:
    """``--mixed-budgets`` entry -> engine settings: a token budget, or ``off``."""
    if budget == "off":
        return {"prefill_budget_tokens": 10**9, "chunk_vision": False}
    return {"prefill_budget_tokens": int(budget)}
