"""The API against its own OpenAPI schema: schemathesis (pinned in pyproject.toml) generates
requests from ``/v1/openapi.json`` and sends them to a live server (uvicorn, the tiny model
on CPU) with a real key, checking every response: no 5xx, only documented status codes,
content types, headers and bodies, schema-valid requests accepted and invalid ones refused,
authentication never ignored.

Bounded for ``make test``: a fixed seed and number of examples per operation, one worker,
the model's answers at most a few tokens; about a minute on the 2 shared cores. The rules
OpenAPI 3.0 cannot state are applied to the generated valid requests by
``schemathesis_hooks.py`` (it says which and why).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.factories import PlanFactory, TenantFactory, api_key_for

pytest_plugins = ["tests.webplatform.live_server"]

SEED = 20261204
MAX_EXAMPLES = 30
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_api_conforms_to_its_openapi_schema(live_asgi_server, settings, tmp_path) -> None:
    if not SCHEMATHESIS.exists():
        pytest.fail("schemathesis is not installed (pip install -e '.[test]')")
    plan = PlanFactory(
        requests_per_minute=100_000,
        tokens_per_day=100_000_000,
        max_output_tokens=4,
        concurrent_requests=8,
    )
    key = api_key_for(TenantFactory(plan=plan)).raw_key
    report = tmp_path / "junit.xml"
    command = [
        str(SCHEMATHESIS),
        "run",
        f"{live_asgi_server.url}/v1/openapi.json",
        "--checks",
        "all",
        "--header",
        f"Authorization: Bearer {key}",
        "--seed",
        str(SEED),
        "--max-examples",
        str(MAX_EXAMPLES),
        "--workers",
        "1",
        "--request-timeout",
        "120",
        # Answers run the model on 2 shared CPU cores: slow, not broken.
        "--max-response-time",
        "120",
        "--no-color",
        # No example database: every run starts from the seed alone, and writes nothing
        # into the checkout.
        "--generation-database",
        "none",
        "--continue-on-failure",
        "--report",
        "junit",
        "--report-junit-path",
        str(report),
    ]
    root = Path(__file__).resolve().parents[3]
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.webplatform.api.schemathesis_hooks",
        "PYTHONPATH": str(root),
    }
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=560, cwd=root)

    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-60_000:]
    assert "No issues found" in output or " 0 failures" in output or "passed" in output, output
