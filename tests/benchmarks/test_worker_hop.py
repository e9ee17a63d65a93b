"""``benchmarks/worker_hop.py`` run tiny (a few requests each way), so that it keeps working.

A real worker process on the suite's Redis (``REDIS_URL``) under a key prefix of the
benchmark's own, which it deletes afterwards; the tiny checkpoint of the session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.inference.fakes import redis_url_for_tests

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.redis


def test_the_worker_hop_benchmark_times_every_hand_off_both_ways(tmp_path, tiny_model_dir):
    url = redis_url_for_tests()
    if url is None:
        pytest.skip("needs REDIS_URL pointing at a reachable Redis")
    out = tmp_path / "summary.json"
    argv = [sys.executable, "benchmarks/worker_hop.py", "--redis-url", url]
    argv += ["--model-dir", str(tiny_model_dir), "--requests", "3", "--rounds", "1"]
    argv += ["--warm-up", "1", "--json", str(out)]
    done = subprocess.run(
        argv, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "in-process p50 / Redis p50" in done.stdout
    summary = json.loads(out.read_text())
    assert [(row["mode"], row["requests"]) for row in summary["rows"]] == [
        ("inprocess", 3), ("redis", 3)
    ]  # fmt: skip
    assert 0 < summary["ratio_ppm"]
    for mode in ("inprocess_ppm", "redis_ppm"):
        stages = summary["breakdown"][mode]
        # Every hand-off was seen, in both processes (the worker's stamps came back).
        assert all(ms == ms for ms in stages.values()), (mode, stages)  # no NaN
        assert stages["engine steps (to the terminal event)"] > 0
