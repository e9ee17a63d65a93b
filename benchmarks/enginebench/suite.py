"""The GPU-speed issue's figures in one budgeted run (``benchmarks/engine.py --mode suite``).

Stages, in order of importance (a stage that no longer fits ``--budget-s``, counted from
the process start, is recorded as skipped; one that fails is recorded as an error and the
run goes on):

1. the engine at its defaults, warmed (on CUDA every decode shape captured as a graph; if
   that fails, once more without graphs): decode step alone by batch, one request alone,
   TTFT by stage, engine steps by batch, all requests at once, a closed loop at full
   concurrency;
2. naive ``model.generate`` (one left-padded batch);
3. worker start to ready in a fresh process (the full-size random model is saved first);
4. the decode steps again with ``compile_batch_sizes`` on the measured buckets;
5. ``generate(cache_implementation="static")``: its compile run timed apart, per batch;
6. mixed load: inter-token latency while large images arrive, chunked prefill and not;
7. last, a profile of a decode step of the engine of stage 1 (starting the CUDA profiler
   after graph capture has broken CUDA contexts on some versions: nothing comes after it).
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from inference.engine import Engine, EngineConfig

from . import generate, models, report, startup, workloads
from .mixed import run_mixed
from .profiling import decode_profile, ttft_stages

# Rough seconds per stage on an H100/H200 with the full-size model (for the time budget).
GPU_ESTIMATES = {
    "engine build": 30,  # KV slots, a warm-up prefill, a graph per decode shape
    "decode steps": 20,
    "engine alone": 5,
    "ttft stages": 3,
    "engine batches": 15,
    "sustained": 30,
    "profile": 15,
    "naive": 40,
    "compiled": 90,
    "startup": 90,
    "static": 120,  # per batch size: transformers compiles its decode step for each
    "mixed": 45,  # all four runs
}


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


# ---------------------------------------------------------------------------- suite
def suite(args: argparse.Namespace, tiny_dir: Path) -> None:
    """Run every stage that fits; records to ``--out``, Markdown printed at the end."""
    out = Path(args.out) if args.out else None
    rec = report.Recorder(out, args.budget_s, started=args.process_started)
    estimate = GPU_ESTIMATES if args.full_size else dict.fromkeys(GPU_ESTIMATES, 0)
    built = time.perf_counter()
    runner = models.without_eos(models.runner_from_args(args, tiny_dir))
    build_s = time.perf_counter() - built
    text = workloads.question(runner.tokenizer, args.question_tokens)
    top = max(args.concurrency)
    n_sustained = args.sustained_requests or 5 * top
    requests, images = workloads.make_requests(
        max(top, n_sustained), args.image_size, text, args.new_tokens
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
    # Room for the standard request, and for the timed decode steps of one request.
    max_seq_len = prompt.length + max(args.new_tokens, args.steps + 12)

    def build_engine(**config: object) -> tuple[Engine, float]:
        engine = Engine(
            runner,
            EngineConfig(
                max_batch_size=top,
                max_seq_len=max_seq_len,
                prefill_chunk_tokens=args.chunk,
                preprocess_threads=args.preprocess_threads,
                **config,  # type: ignore[arg-type]
            ),
        )
        return engine, engine.warmup()

    batches = sorted({b for b in (1, 8, 32) if b <= top} | {top})

    def main_engine() -> Engine:
        return engines[0]

    def step_times(engine: Engine, variant: str) -> None:
        """The decode step alone, then the whole engine step, per batch."""
        for b in batches:
            t = workloads.decoder_step_times(
                engine, batch=b, position=prompt.length + args.new_tokens // 2, repeats=args.steps
            )
            rec.add(
                "decoder_step",
                variant=variant,
                batch=b,
                wall_median_s=statistics.median(t["wall"]),
                device_median_s=statistics.median(t["device"]) if t["device"] else None,
            )
        for b in batches:
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

    def engine_runs(n: int) -> None:
        """``n`` requests submitted at once, the fastest of ``--repeat`` runs."""
        runs = [
            workloads.run_engine(main_engine(), requests[:n], images, tag=f"b{n}-{i}")
            for i in range(args.repeat)
        ]
        rec.add("run", path="engine", streams=n, **best(runs))

    def stages() -> None:
        rec.add("ttft_stages", stages=ttft_stages(main_engine(), requests[0], images))

    def sustained() -> None:
        result = workloads.run_sustained(
            main_engine(), requests[:n_sustained], images, concurrency=top, tag="sustained"
        )
        rec.add("sustained", **result)

    def profile() -> None:
        table = out / "profile-decode.txt" if out else None
        result = decode_profile(
            main_engine(),
            requests[:top],
            images,
            steps=min(args.steps, 20),
            tag="prof",
            table_path=table,
        )
        rec.add("profile", **result)

    def compiled_steps() -> None:
        """The same steps with the decode parts compiled for each measured batch bucket."""
        compiled, seconds = build_engine(
            decode_batch_sizes=tuple(batches), compile_batch_sizes=tuple(batches)
        )
        rec.add("compiled_build", warmup_s=seconds, batches=batches)
        step_times(compiled, "compiled")
        compiled.close()

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
            # Just written, so the weights load from the page cache: a warm-disk start.
            # A serving configuration: the default context per slot (4096 tokens), so the
            # warm-up captures every batch bucket x KV bucket a worker would.
            serving_len = max(EngineConfig().max_seq_len, max_seq_len)
            result = startup.measure_startup(
                checkpoint,
                max_batch_size=top,
                max_seq_len=serving_len,
                device=str(runner.device),
                timeout_s=max(60.0, (args.budget_s or 3600) - rec.elapsed),
            )
        rec.add("startup", save_s=save_s, max_seq_len=serving_len, **result)

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
            for chunk in (args.chunk, None):
                if not rec.allows(f"mixed {size}px chunk={chunk}", estimate["mixed"] / 4):
                    continue
                result = run_mixed(
                    runner,
                    chunk=chunk,
                    size=size,
                    streams=args.streams,
                    count=args.large_count,
                    question_tokens=args.question_tokens,
                    preprocess_threads=args.preprocess_threads,
                )
                rec.add("mixed", **result)

    engines: list[Engine] = []

    def default_engine() -> None:
        """The engine at its defaults, warmed. If its warm-up fails (on CUDA: the graph
        capture), once more without CUDA graphs, so that the other figures still come."""
        try:
            engine, warmup_s = build_engine()
        except Exception as exc:
            if runner.device.type != "cuda":
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
            batch_buckets=list(stats.decode_batch_sizes),
        )
        engines.append(engine)

    # In order of importance. The profile comes last: starting the CUDA profiler after
    # graphs were captured has broken CUDA contexts on some versions (pytorch#75504).
    engine_plan = [
        ("decode steps", lambda: step_times(main_engine(), "default")),
        ("engine alone", lambda: engine_runs(1)),
        ("ttft stages", stages),
        ("engine batches", lambda: [engine_runs(n) for n in args.concurrency if n > 1]),
        ("sustained", sustained),
    ]
    later = [
        ("naive", naive),
        ("startup", start_to_ready),
        ("compiled", compiled_steps),
        ("static", static),
        ("mixed", mixed),
    ]
    if "engine" in args.skip:
        rec.add("skipped", what="engine", reason="--skip")
    elif rec.stage("engine build", estimate["engine build"], default_engine):
        for name, fn in engine_plan:
            rec.stage(name, estimate[name], fn)
    for name, fn in later:
        if name in args.skip:
            rec.add("skipped", what=name, reason="--skip")
            continue
        # static and mixed check the budget before each of their runs
        rec.stage(name, 0 if name in ("static", "mixed") else estimate[name], fn)
        if runner.device.type == "cuda":
            torch.cuda.empty_cache()
    if engines:
        rec.stage("profile", estimate["profile"], profile)
        engines[0].close()
    rec.close()
    markdown = report.render(rec.records)
    if out is not None:
        (out / "engine-bench.md").write_text(markdown)
    print(markdown, flush=True)
