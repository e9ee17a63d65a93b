"""``benchmarks/request_stages.py``: its probes still apply to the code, and its table is
what the probes' timestamps say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from request_stages import DIFF, stage_cycles, stage_table  # noqa: E402


def test_the_probes_still_apply_to_this_checkout() -> None:
    # A change that moves a probed line must move the probe too, or this fails.
    checked = subprocess.run(
        ["git", "apply", "--check", str(DIFF)], cwd=ROOT, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr
    probes = [line for line in DIFF.read_text().splitlines() if "stage(" in line]
    labels = [line.split("stage(", 1)[1] for line in probes if line.startswith("+")]
    numbers = sorted(label[1:3] for label in labels if label[1:3].isdigit())
    assert numbers[0] == "00"  # the client's send starts each request
    assert len(numbers) >= 25


def _lines(*requests: list[tuple[int, str]]) -> list[str]:
    return [f"{ns} {label}" for request in requests for ns, label in request]


def test_each_stage_is_the_time_since_the_one_before_over_complete_requests() -> None:
    ms = 1_000_000
    requests = [
        [(t0, "00 client sends"), (t0 + 2 * ms, "01 web"), (t0 + 5 * ms, "02 client has it")]
        for t0 in range(0, 100 * 20 * ms, 20 * ms)
    ]
    # A stage seen twice in a request counts at its first time; processes' files interleave.
    requests[50].append((50 * 20 * ms + 3 * ms, "01 web"))
    incomplete = [(100 * 20 * ms, "00 client sends"), (100 * 20 * ms + ms, "01 web")]
    lines = list(reversed(_lines(*requests, incomplete)))
    cycles = stage_cycles(lines)
    assert len(cycles) == 101
    rows = stage_table(cycles)
    assert [row[0] for row in rows] == ["01 web", "02 client has it", "whole request"]
    assert rows[0][1:] == (2.0, 2.0)
    assert rows[1][1:] == (3.0, 3.0)
    assert rows[2][1:] == (5.0, 5.0)


def test_no_complete_request_is_an_error_not_an_empty_table() -> None:
    with pytest.raises(ValueError, match="no request reached every stage"):
        stage_table(
            stage_cycles(["1 00 client sends", "2 01 web", "3 00 client sends", "4 02 worker"])
        )
