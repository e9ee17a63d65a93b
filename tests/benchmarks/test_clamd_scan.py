"""``benchmarks/clamd_scan.py`` runs against the project's clamd and prints its table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_it_times_decode_scan_and_rescan_per_image_type() -> None:
    url = os.environ.get("CLAMD_URL", "")
    if not url:
        pytest.fail("This test needs clamd: export CLAMD_URL=$(bash scripts/clamd-test.sh)")
    out = subprocess.run(
        [sys.executable, "benchmarks/clamd_scan.py", "--rounds", "1", "--clamd-url", url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and " KB |" in line]
    assert [row.split(" | ")[0] for row in rows] == [
        "| 520 px JPEG",
        "| 12 MP JPEG (4000x3000)",
        "| 1920x1080 PNG screenshot",
        "| 672 px PNG noise",
    ]
    for row in rows:
        decode, scan, rescan, ratio = (float(cell) for cell in row.strip("| ").split(" | ")[2:])
        assert decode > 0 and scan > 0 and rescan >= 0  # one decimal: a cache hit can read 0.0
        assert ratio == pytest.approx(scan / decode, rel=0.05, abs=0.01)  # cells are rounded
