"""``benchmarks/gc_pause.py``: what the freeze after the load does to a full collection's
pause, in a worker (the session's tiny checkpoint) and in the web process (the ASGI app), so
that it keeps working and keeps holding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("process", ["worker", "web"])
def test_freezing_what_the_process_loaded_takes_it_out_of_full_collections(
    tmp_path, tiny_model_dir, process
):
    out = tmp_path / "summary.json"
    argv = [sys.executable, "benchmarks/gc_pause.py", "--process", process]
    argv += ["--model-dir", str(tiny_model_dir), "--collections", "3", "--json", str(out)]
    done = subprocess.run(
        argv, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(out.read_text())
    # Nearly every object the load left is frozen, and a full collection no longer walks
    # them: a small fraction of its time before (dev machine: worker 133-143 ms, web
    # process 60-63 ms, both -> 0.01 ms).
    assert summary["process"] == process
    assert summary["frozen_objects"] > 0.9 * summary["tracked_objects"] > 100_000
    assert summary["after_ms"]["p50"] < 0.1 * summary["before_ms"]["p50"]
