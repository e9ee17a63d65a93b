"""``benchmarks/worker_loop.py`` run tiny (a few steps, both paths), so that it keeps working.

It runs against the suite's Redis (``REDIS_URL``) with ``--keep-db``: the database is
shared, so the benchmark deletes only its own keys instead of flushing it.
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


def test_the_worker_loop_benchmark_runs_both_paths(tmp_path):
    url = redis_url_for_tests()
    if url is None:
        pytest.skip("needs REDIS_URL pointing at a reachable Redis")
    out = tmp_path / "summary.json"
    argv = [sys.executable, "benchmarks/worker_loop.py", "--redis-url", url, "--keep-db"]
    argv += ["--streams", "1", "3", "--steps", "12", "--step-ms", "1", "--rounds", "1"]
    argv += ["--json", str(out)]
    done = subprocess.run(
        argv, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "new/old" in done.stdout
    rows = json.loads(out.read_text())
    assert [(row["streams"], row["path"]) for row in rows] == [
        (1, "old"), (1, "new"), (3, "old"), (3, "new")
    ]  # fmt: skip
    for row in rows:
        assert row["gap_samples"] > 0 and row["publish_samples"] > 0
        assert row["gap_p99_ms"] >= row["gap_p50_ms"] >= 0
        assert row["publish_p50_ms"] > 0
    calls = {row["path"]: row["loop_redis_calls_per_step"] for row in rows}
    assert calls["new"] == 0 and calls["old"] >= 2  # publish and cancel marks, every step
