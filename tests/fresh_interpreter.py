"""Code run in a fresh Python interpreter, for what one process does at import or start-up
(settings read once, allocator settings, what a module loads) that the test process, set
up long before, cannot show."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def web_env(*, drop_prefixes: tuple[str, ...] = ()) -> dict[str, str]:
    """This process's environment for a fresh web process: Django's settings module, no
    model preloaded, none of the services' URLs (the settings' embedded defaults), and
    without the variables that start with ``drop_prefixes``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "REDIS_URL") and not k.startswith(drop_prefixes)
    }
    env.update(DJANGO_SETTINGS_MODULE="webplatform.settings", INFERENCE_PRELOAD="false")
    return env


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
