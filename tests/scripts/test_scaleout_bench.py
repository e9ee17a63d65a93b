"""scripts/scaleout_bench.py, small: real worker processes (the tiny model) on the real
Redis answer every request, and the elastic run adds a worker under load and SIGTERMs the
first one without losing or failing a request."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.inference.fakes import redis_url_for_tests

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.redis
@pytest.mark.slow
def test_a_worker_added_and_one_removed_under_load_lose_no_request(request, tmp_path):
    url = redis_url_for_tests()
    if url is None:
        pytest.fail("needs REDIS_URL pointing at a reachable Redis (make test sets it)")
    from tests.webplatform.live_server import tiny_model_path

    out = tmp_path / "scaleout.json"
    argv = [sys.executable, str(ROOT / "scripts" / "scaleout_bench.py")]
    argv += ["--workers", "1", "--requests", "8", "--concurrency", "4", "--max-tokens", "16"]
    argv += ["--batch", "2", "--elastic-requests", "8"]
    argv += ["--model-dir", str(tiny_model_path(request.config)), "--redis-url", url]
    argv += ["--json", str(out)]
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads(out.read_text())
    (fixed,) = results["fixed"]
    assert fixed["workers"] == 1 and fixed["requests"] == 8 and fixed["all_done"]
    elastic = results["elastic"]
    assert elastic["failed"] == [] and elastic["done"] == elastic["requests"]
    # The second worker joined after the first answers, the first was told to stop while
    # requests were in flight, drained, exited 0, and the second answered the rest.
    assert 0 < elastic["added_after"] <= elastic["removed_after"] <= elastic["exited_after"]
    assert elastic["exited_after"] < elastic["requests"]
    assert elastic["first_exit_code"] == 0
