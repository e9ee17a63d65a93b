"""Code run in a fresh Python interpreter, for what one process does at import or start-up
(settings read once, allocator settings, what a module loads) that the test process, set
up long before, cannot show."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def python_json(code: str, *args: str, env: Mapping[str, str]) -> Any:
    """Run ``python -c code args...`` in the repository root with exactly ``env``; the last
    line it prints, parsed as JSON. Fails the test when it exits non-zero."""
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])
