"""Worker start to ready: a fresh process loads a checkpoint folder and warms the engine.

The child runs what the worker runs (``engine_from_spec``: ``ModelRunner.from_spec`` loads
the weights onto the device, ``Engine`` allocates the KV slots, ``warmup`` runs a prefill and
captures every decode shape) and reports when it is ready; the parent times it from the
moment it spawned the process, so interpreter start and imports are included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ENTRY = Path(__file__).resolve().parents[1] / "engine.py"
_MARK = "STARTUP-RESULT "


def measure_startup(
    checkpoint: Path, *, device: str, compile_cache_dir: str, timeout_s: float
) -> dict[str, Any]:
    """Seconds from spawning a process to its warmed engine (the engine's default settings,
    compiled kernels cached in ``compile_cache_dir``), with the child's breakdown."""
    command = [
        sys.executable,
        str(ENTRY),
        "--mode",
        "startup-child",
        "--model",
        str(checkpoint),
        "--device",
        device,
        "--compile-cache-dir",
        compile_cache_dir,
    ]
    spawned = time.time()
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout_s, env=dict(os.environ)
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(_MARK)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"startup child failed ({done.returncode}): {done.stderr[-2000:] or done.stdout[-2000:]}"
        )
    child = json.loads(lines[-1].removeprefix(_MARK))
    return {
        "start_to_ready_s": child["ready_at"] - spawned,
        "interpreter_and_imports_s": child["imported_at"] - spawned,
        "load_s": child["load_s"],
        "warmup_s": child["warmup_s"],
        "device": child["device"],
        "max_batch_size": child["max_batch_size"],
        "max_seq_len": child["max_seq_len"],
        "shapes": child["shapes"],
        "compiled_buckets": child["compiled_buckets"],
        "compile_error": child["compile_error"],
    }


def child_main(checkpoint: str, *, device: str, compile_cache_dir: str) -> None:
    """The child's side: import, load, warm up, print one result line."""
    imported_at = time.time()
    from inference.engine import EngineConfig, engine_from_spec

    config = EngineConfig(compile_cache_dir=compile_cache_dir)
    started = time.perf_counter()
    engine = engine_from_spec({"path": checkpoint, "device": device}, config)
    total = time.perf_counter() - started
    ready_at = time.time()
    warmup = engine.warmup_seconds or 0.0
    result = {
        "imported_at": imported_at,
        "ready_at": ready_at,
        "load_s": total - warmup,
        "warmup_s": warmup,
        "device": engine.runner.device_name,
        "max_batch_size": engine.batch_limit,
        "max_seq_len": engine.config.max_seq_len,
        "shapes": len(engine.decoder.shapes),
        "compiled_buckets": list(engine.decoder.compiled_batch_sizes),
        "compile_error": engine.decoder.compile_error,
    }
    print(_MARK + json.dumps(result), flush=True)
