"""Where one request's time goes, stage by stage, through the whole platform path.

``benchmarks/api.py`` gives the platform's overhead over the engine alone as one figure;
this splits it. It makes a scratch worktree of ``HEAD`` (what is committed: uncommitted
changes are not measured), applies ``benchmarks/request_stages.diff`` there (a probe at each
step of the path: a ``CLOCK_MONOTONIC`` timestamp, one clock for every process of the
machine, written to a file per process, a few microseconds each), runs that worktree's
``benchmarks/api.py --modes redis --clients 1`` with the probes on, and prints, for each
stage in the path's order, the median and mean time since the stage before it: the load
client's send, the web process (uvicorn, Django, DRF, admission, validation and its clamd
stream, the enqueue), the worker (its IO thread, the engine), the way back (the reply
read, the settlement, the response) and the client's receipt.

One client, so the stages of one request are in order and nothing overlaps them but the
machine's other processes (clamd's scan, the previous request's after-response work).
The probes are a diff, not code of the product: a probe costs nothing in this benchmark's
figures, and the product carries none. ``tests/benchmarks/test_request_stages.py`` checks
that the diff still applies, so a change that moves a probed line fails the suite.

    CLAMD_URL=tcp://127.0.0.1:3317 .venv/bin/python benchmarks/request_stages.py \
        --requests 300 --model-dir /tmp/tiny-glm4v

``benchmarks/worker_hop.py`` takes the worker's part apart further (per-thread CPU, engine
steps) without HTTP.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DIFF = REPO / "benchmarks" / "request_stages.diff"
FIRST = "00"  # the label number of a request's first stage (the client's send)
WARM_UP_SHARE = 0.1  # the first requests' stages are left out (caches, first connections)


def stage_cycles(lines: Iterable[str]) -> list[dict[str, int]]:
    """The probes' lines (``<ns> <label>``, every process's, any order) as one dict per
    request, label -> the first time it was reached after the request's first stage."""
    events = sorted((int(ns), label) for ns, label in (line.split(" ", 1) for line in lines))
    cycles: list[dict[str, int]] = []
    for ns, label in events:
        label = label.strip()
        if label.startswith(FIRST + " "):
            cycles.append({label: ns})
        elif cycles and label not in cycles[-1]:
            cycles[-1][label] = ns
    return cycles


def stage_table(cycles: list[dict[str, int]]) -> list[tuple[str, float, float]]:
    """Each stage (in label order) with the median and mean milliseconds since the stage
    before it, over the requests that reached every stage, less the warm-up's."""
    labels = sorted({label for cycle in cycles for label in cycle})
    complete = [cycle for cycle in cycles if all(label in cycle for label in labels)]
    measured = complete[int(len(complete) * WARM_UP_SHARE) :]
    if not measured:
        raise ValueError("no request reached every stage")
    rows = []
    for before, label in zip(labels, labels[1:], strict=False):
        spans = [(cycle[label] - cycle[before]) / 1e6 for cycle in measured]
        rows.append((label, statistics.median(spans), statistics.mean(spans)))
    whole = [(cycle[labels[-1]] - cycle[labels[0]]) / 1e6 for cycle in measured]
    rows.append(("whole request", statistics.median(whole), statistics.mean(whole)))
    return rows


def print_table(rows: list[tuple[str, float, float]], requests: int) -> None:
    print(f"\nstages of {requests} requests, one client (ms since the stage before)")
    print(f"{'stage reached':<48} {'p50':>8} {'mean':>8}")
    for label, p50, mean in rows:
        print(f"{label:<48} {p50:8.2f} {mean:8.2f}")


def _worktree(tree: Path) -> None:
    """``HEAD`` in ``tree`` with the probes applied (removed by the caller, also on failure)."""
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(tree), "HEAD"],
        check=True,
    )
    subprocess.run(["git", "-C", str(tree), "apply", str(DIFF)], check=True)
    # The compiled translations are not in git; the servers read them.
    for compiled in REPO.glob("locale/*/LC_MESSAGES/*.mo"):
        target = tree / compiled.relative_to(REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(compiled, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--model-dir", help="an existing tiny checkpoint (else api.py builds one)")
    parser.add_argument("--clamd-url", default="", help="as api.py's (default: $CLAMD_URL)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-stages-") as tmp_name:
        tmp = Path(tmp_name)
        tree = tmp / "tree"
        try:
            _worktree(tree)
            command = [sys.executable, str(tree / "benchmarks" / "api.py")]
            command += ["--modes", "redis", "--clients", "1", "--rounds", "1"]
            command += ["--min-requests", str(args.requests)]
            if args.model_dir:
                command += ["--model-dir", str(Path(args.model_dir).resolve())]
            if args.clamd_url:
                command += ["--clamd-url", args.clamd_url]
            env = {**os.environ, "STAGE_TRACE": str(tmp / "trace")}
            subprocess.run(command, cwd=tree, env=env, check=True)
            lines = [
                line
                for trace in tmp.glob("trace.*")
                for line in trace.read_text().splitlines()
                if line
            ]
        finally:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False
            )
            subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], check=False)
    cycles = stage_cycles(lines)
    print_table(stage_table(cycles), len(cycles))


if __name__ == "__main__":
    main()
