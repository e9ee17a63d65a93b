"""scripts/scaleout_bench.py, small: real worker processes (the tiny model) answer every
request, and the elastic run adds a worker under load and SIGTERMs the first one without
losing or failing a request. On loopback against the suite's Redis, and in netns mode: each
worker in its own network namespace, reaching a private Redis over a veth pair, everything
removed afterwards (also when the run is interrupted)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.inference.fakes import redis_url_for_tests

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "scaleout_bench.py"
SMALL = ["--requests", "8", "--concurrency", "4", "--max-tokens", "16", "--batch", "2"]


def netns_unavailable() -> str | None:
    probe = f"scaleout-test-probe-{os.getpid()}"
    try:
        done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    except FileNotFoundError:
        return "no ip(8) command"
    if done.returncode != 0:
        return f"`ip netns add` fails here ({done.stderr.strip()}): needs root or CAP_NET_ADMIN"
    subprocess.run(["ip", "netns", "del", probe], check=True)
    return None


def namespaces_now() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def links_now() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    return {line.split(":")[1].strip().split("@")[0] for line in out.stdout.splitlines()}


def assert_elastic_lost_nothing(elastic: dict[str, object]) -> None:
    assert elastic["failed"] == [] and elastic["done"] == elastic["requests"]
    # The second worker joined after the first answers, the first was told to stop while
    # requests were in flight, drained, exited 0, and the second answered the rest.
    added, removed, exited = (
        elastic["added_after"],
        elastic["removed_after"],
        elastic["exited_after"],
    )
    assert isinstance(added, int) and isinstance(removed, int) and isinstance(exited, int)
    assert 0 < added <= removed <= exited
    assert isinstance(elastic["requests"], int) and exited < elastic["requests"]
    assert elastic["first_exit_code"] == 0


@pytest.mark.redis
@pytest.mark.slow
def test_a_worker_added_and_one_removed_under_load_lose_no_request(request, tmp_path):
    url = redis_url_for_tests()
    if url is None:
        pytest.fail("needs REDIS_URL pointing at a reachable Redis (make test sets it)")
    from tests.webplatform.live_server import tiny_model_path

    out = tmp_path / "scaleout.json"
    argv = [sys.executable, str(SCRIPT), "--network", "loopback", "--workers", "1", *SMALL]
    argv += ["--elastic-requests", "8", "--model-dir", str(tiny_model_path(request.config))]
    argv += ["--redis-url", url, "--json", str(out)]
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads(out.read_text())
    assert results["network"] == "loopback"
    (fixed,) = results["fixed"]
    assert fixed["workers"] == 1 and fixed["requests"] == 8 and fixed["all_done"]
    assert_elastic_lost_nothing(results["elastic"])


@pytest.mark.slow
def test_workers_in_their_own_network_namespaces_answer_everything_and_leave_nothing(
    request, tmp_path
):
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    from tests.webplatform.live_server import tiny_model_path

    out = tmp_path / "scaleout.json"
    argv = [sys.executable, str(SCRIPT), "--network", "netns", "--workers", "2", *SMALL]
    argv += ["--elastic-requests", "8", "--model-dir", str(tiny_model_path(request.config))]
    argv += ["--json", str(out)]
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads(out.read_text())
    assert results["network"] == "netns"
    net = results["netns"]
    namespaces, veths, addrs = net["namespaces"], net["veths"], net["worker_addrs"]
    assert len(namespaces) == len(veths) == len(addrs) == 2

    (fixed,) = results["fixed"]
    assert fixed["network"] == "netns" and fixed["workers"] == 2
    assert fixed["requests"] == 8 and fixed["all_done"]
    # Each worker process was found (ip netns identify <pid>) in its own namespace ...
    assert sorted(fixed["namespaces"].values()) == sorted(namespaces)
    # ... and Redis saw its connections come from the namespace ends of the veths, not from
    # the loopback: the workers reached it over the network interfaces.
    assert set(addrs) <= set(fixed["redis_peers"])
    assert all(not a.startswith("127.") for a in addrs)

    # The round trip of a Redis PING from inside the first namespace was measured.
    assert (
        0 < results["redis_ping"]["netns"]["median_us"] <= results["redis_ping"]["netns"]["p99_us"]
    )

    elastic = results["elastic"]
    assert elastic["network"] == "netns"
    assert elastic["namespaces"] == {"e-first": namespaces[0], "e-second": namespaces[1]}
    assert_elastic_lost_nothing(elastic)

    # Nothing of the run is left: namespaces, veths, the private Redis.
    assert results["teardown_errors"] == []
    assert not set(namespaces) & namespaces_now()
    assert not set(veths) & links_now()
    port = int(net["redis"].rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


@pytest.mark.slow
def test_an_interrupted_netns_run_removes_its_namespaces_veths_and_redis(request, tmp_path):
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    from tests.webplatform.live_server import tiny_model_path

    out = tmp_path / "scaleout.json"
    argv = [sys.executable, str(SCRIPT), "--network", "netns", "--workers", "2", *SMALL]
    argv += ["--elastic-requests", "0", "--model-dir", str(tiny_model_path(request.config))]
    argv += ["--json", str(out)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    mine = {f"scaleout-{proc.pid}-0", f"scaleout-{proc.pid}-1"}
    try:
        # Interrupt once the workers run inside the namespaces (loading the model).
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the workers never started in their namespaces"
            if mine <= namespaces_now() and all(
                subprocess.run(
                    ["ip", "netns", "pids", ns], capture_output=True, text=True
                ).stdout.strip()
                for ns in mine
            ):
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        output = proc.communicate(timeout=120)[0].decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, output
    results = json.loads(out.read_text())
    net = results["netns"]
    assert set(net["namespaces"]) == mine
    assert results["teardown_errors"] == []
    assert not mine & namespaces_now()
    assert not set(net["veths"]) & links_now()
    port = int(net["redis"].rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
