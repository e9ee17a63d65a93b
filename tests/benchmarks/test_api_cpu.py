"""``benchmarks/apibench/cpu.py``: the CPU of a level, per request, charged to the process
group that spent it (the servers under the load client by their command line, with their
own children; the shared services by name)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from apibench import cpu

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")

# Waits for a line on stdin, burns ``CPU_S`` seconds of its own CPU, says so, then waits to
# be killed (a process counts only while seen in both snapshots).
SPIN = """
import sys, time
print("ready", flush=True)
sys.stdin.readline()
end = time.process_time() + float(sys.argv[1])
while time.process_time() < end:
    pass
print("done", flush=True)
sys.stdin.readline()
"""
# A "server" that leaves its work to a child of its own: the child's CPU is the server's.
PARENT = (
    "import subprocess, sys; "
    "subprocess.run([sys.executable, '-c', sys.argv[1], sys.argv[2]], check=True)"
)
CPU_S = 0.3


def _start(argv: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def _run_all(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline() == "done\n"


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


def test_servers_under_the_client_are_charged_by_their_command_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cpu, "SERVICES", {})  # the machine's own Redis is not this test's
    # The argument after the script only names the process, as uvicorn's and the worker's
    # command lines do; the web process's CPU is spent by its child.
    web = _start([sys.executable, "-c", PARENT, SPIN, str(CPU_S), "uvicorn"])
    worker = _start([sys.executable, "-c", SPIN, str(2 * CPU_S), "-m", "inference.worker"])
    other = _start([sys.executable, "-c", SPIN, str(CPU_S)])
    try:
        before = cpu.snapshot()
        _run_all([web, worker, other])
        used = cpu.ms_per_request(before, cpu.snapshot(), requests=2)
    finally:
        _stop([web, worker, other])
    # Per request: half of each process's CPU. A tick is 10 ms; the 2 s bound is loose for
    # a shared machine (only CPU is counted, never waiting).
    assert 140 <= used["web"] <= 200, used
    assert 290 <= used["worker"] <= 350, used
    assert 140 <= used["other"] <= 200, used
    assert set(used) <= {"client", "web", "worker", "other"}, used


def test_a_service_is_known_by_its_name_and_only_outside_the_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A name of its own (the machine's real Redis would be counted too): the process's name
    # is its executable's.
    monkeypatch.setattr(cpu, "SERVICES", {"fake-redis": "redis"})
    named = tmp_path / "fake-redis"
    named.symlink_to(sys.executable)
    service = _start([str(named), "-c", SPIN, str(CPU_S)])
    # A client other than this test's process, so that the service is not under it.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        before = cpu.snapshot(root=sleeper.pid)
        assert before[service.pid][0] == "redis"
        assert before[sleeper.pid][0] == "client"
        _run_all([service])
        used = cpu.ms_per_request(before, cpu.snapshot(root=sleeper.pid), requests=1)
        # Under this test's own process, the same executable is just another child.
        assert cpu.snapshot()[service.pid][0] == "other"
    finally:
        _stop([service, sleeper])
    assert 280 <= used["redis"] <= 400, used


def test_a_process_seen_once_counts_for_nothing() -> None:
    before = {1: ("web", 100), 2: ("worker", 50)}
    after = {1: ("web", 150), 3: ("worker", 500)}  # 2 ended, 3 started: neither counts
    assert cpu.ms_per_request(before, after, requests=5) == {"web": 50 * 1000 / cpu.TICKS_PER_S / 5}
    assert cpu.ms_per_request(before, after, requests=0) == {}


def test_a_name_with_spaces_and_parentheses_is_read_whole(tmp_path: Path) -> None:
    named = tmp_path / "a) (b c"
    named.symlink_to(sys.executable)
    proc = subprocess.Popen([str(named), "-c", "import time; time.sleep(60)"])
    try:
        # /proc shows the name after the exec; until then, the parent's.
        for _ in range(200):
            read = cpu._read(proc.pid)
            if read is not None and read.comm == "a) (b c":
                break
            time.sleep(0.01)
        assert read is not None and read.comm == "a) (b c"
        assert read.ppid == os.getpid() and read.ticks >= 0
    finally:
        proc.kill()
        proc.wait()
