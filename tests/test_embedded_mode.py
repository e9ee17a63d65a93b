"""The embedded mode as ``make run`` starts it: no DATABASE_URL, no REDIS_URL, one process.

Runs the real commands in a child process with a clean environment (SQLite in a temporary
folder, process-local cache and quotas, in-process inference on the tiny model) and talks
to the server over HTTP, so this is the path a newcomer takes, not a test double of it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def embedded_env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, str]:
    var_dir = tmp_path_factory.mktemp("embedded-var")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DATABASE_URL", "REDIS_URL", "CLAMD_", "INFERENCE_", "TEST_DATABASE"))
        and k not in ("PLATFORM_TESTING", "CACHE_KEY_PREFIX", "DJANGO_SETTINGS_MODULE")
    }
    env["PLATFORM_VAR_DIR"] = str(var_dir)
    env["INFERENCE_MODELS"] = json.dumps(
        {"glm-4.6v-flash": {"path": str(tiny_model_dir), "dtype": "float32", "device": "cpu"}}
    )
    return env


def _manage(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def embedded_server(embedded_env: dict[str, str]) -> Iterator[tuple[str, str]]:
    _manage(embedded_env, "migrate", "--no-input", "-v", "0")
    port = _free_port()
    printed = _manage(embedded_env, "demo_setup", "--port", str(port))
    key = re.search(r"\b(sk_[A-Za-z0-9]+_[A-Za-z0-9]+)\b", printed)
    assert key, printed
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "webplatform.asgi:application", "--port", str(port)],
        cwd=ROOT,
        env=embedded_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health/live", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        else:
            pytest.fail("embedded server did not start")
        yield url, key.group(1)
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_demo_key_lists_models(embedded_server: tuple[str, str]) -> None:
    url, key = embedded_server
    response = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200
    assert "glm-4.6v-flash" in [m["id"] for m in response.json()["data"]]
    assert response.headers["x-ratelimit-limit-requests"]


def test_embedded_mode_answers_a_chat_completion(embedded_server: tuple[str, str]) -> None:
    url, key = embedded_server
    response = httpx.post(
        f"{url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={
            "model": "glm-4.6v-flash",
            "messages": [{"role": "user", "content": "What is on the label?"}],
            "max_tokens": 6,
            "temperature": 0,
        },
        timeout=120,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["usage"]["completion_tokens"] >= 1
    assert body["choices"][0]["message"]["content"]


def test_embedded_mode_refuses_a_wrong_key(embedded_server: tuple[str, str]) -> None:
    url, _ = embedded_server
    response = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer sk_nope_nope"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
