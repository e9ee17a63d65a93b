"""The garbage collector's pause in a process that holds an engine, before and after
``inference.allocator.freeze_loaded_objects``.

A worker loads its model once and keeps it; what the load created (torch, transformers,
the model's modules and parameters: hundreds of thousands of objects) lives as long as the
process. Python's cyclic collector walks all of them at every full (generation-2)
collection, which it starts by itself once enough new long-lived objects piled up, on
whichever thread allocates, the engine's included: a pause between two decode steps. This
loads the tiny checkpoint the way a worker does (``engine_for_spec``, warm-up included),
or with ``--process web`` the web process's ASGI app (Django, DRF, the routes), times
``--collections`` full collections (``gc.collect()``), freezes as the process does, and
times them again, in one process. The pause does not depend on the model's size so
much as on its number of Python objects, which the real checkpoint only adds to.

    .venv/bin/python benchmarks/gc_pause.py --model-dir /tmp/tiny
    .venv/bin/python benchmarks/gc_pause.py --process web
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _full_collections_ms(count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - started) * 1000)
    return times


def _load_worker(model_dir: Path) -> object:
    from apibench.request import model_spec

    from inference.worker.engines import engine_for_spec

    return engine_for_spec(model_spec(model_dir))


def _load_web() -> object:
    """The web process's ASGI app, as uvicorn imports it (no model: the Redis wiring's web
    side). Importing it freezes what it loaded; unfrozen again here to time the before."""
    import os

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webplatform.settings")
    os.environ["INFERENCE_PRELOAD"] = "0"
    from webplatform.asgi import application

    gc.unfreeze()
    return application


def measure(process: str, model_dir: Path | None, collections: int) -> dict[str, object]:
    from inference.allocator import freeze_loaded_objects

    loaded = _load_web() if process == "web" else _load_worker(model_dir or Path())
    tracked = len(gc.get_objects())
    before = _full_collections_ms(collections)
    frozen = freeze_loaded_objects()
    after = _full_collections_ms(collections)
    del loaded
    return {
        "process": process,
        "tracked_objects": tracked,
        "frozen_objects": frozen,
        "before_ms": {"p50": statistics.median(before), "max": max(before)},
        "after_ms": {"p50": statistics.median(after), "max": max(after)},
        "ratio_p50": statistics.median(after) / statistics.median(before),
        "machine": f"{platform.machine()} {platform.python_version()}",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--process",
        choices=["worker", "web"],
        default="worker",
        help="what is loaded: a worker's engine (the tiny model), or the web process's app",
    )
    parser.add_argument("--model-dir", default="", help="an existing tiny checkpoint")
    parser.add_argument("--collections", type=int, default=20)
    parser.add_argument("--json", default="", help="write the summary here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-gc-") as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else Path(tmp) / "tiny-glm4v"
        if args.process == "worker" and not args.model_dir:
            from apibench.setups import build_tiny_model

            build_tiny_model(model_dir)
        summary = measure(args.process, model_dir, args.collections)
    before, after = summary["before_ms"], summary["after_ms"]
    assert isinstance(before, dict) and isinstance(after, dict)
    print(f"process: {summary['process']}")
    print(f"objects tracked after the load: {summary['tracked_objects']:,}")
    print(f"frozen: {summary['frozen_objects']:,}")
    print("full collection, ms      p50      max")
    print(f"before the freeze   {before['p50']:9.2f} {before['max']:8.2f}")
    print(f"after the freeze    {after['p50']:9.2f} {after['max']:8.2f}")
    print(f"after / before (p50): {summary['ratio_p50']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
