"""``benchmarks/gc_pause.py`` on the session's tiny checkpoint: what a worker's freeze after
the load does to a full collection's pause, so that it keeps working and keeps holding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_freezing_the_loaded_engine_takes_it_out_of_full_collections(tmp_path, tiny_model_dir):
    out = tmp_path / "summary.json"
    argv = [sys.executable, "benchmarks/gc_pause.py", "--model-dir", str(tiny_model_dir)]
    argv += ["--collections", "3", "--json", str(out)]
    done = subprocess.run(
        argv, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(out.read_text())
    # Nearly every object the load left is frozen, and a full collection no longer walks
    # them: a small fraction of its time before (135 ms -> 0.01 ms on the dev machine).
    assert summary["frozen_objects"] > 0.9 * summary["tracked_objects"] > 100_000
    assert summary["after_ms"]["p50"] < 0.1 * summary["before_ms"]["p50"]
