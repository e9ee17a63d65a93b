"""Subprocesses of the benchmark: run one to completion, keep one running, wait until a
server answers, and a uvicorn server of ``webplatform.asgi`` on a free port.

Every subprocess runs in the repository root.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_checked(command: list[str], env: dict[str, str]) -> str:
    """Run ``command`` to its end; its stdout, or RuntimeError with both outputs."""
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


@contextlib.contextmanager
def process(command: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """``command`` running for the block, its output in ``log``; terminated (then killed
    after 30 s) on the way out."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_ready(url: str, proc: subprocess.Popen, log: Path, *, path: str) -> None:
    """Until ``url + path`` answers 200 (at most 120 s); RuntimeError with the end of
    ``log`` if ``proc`` exits first or time runs out."""
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + path, timeout=5).status_code == 200:
                return
        time.sleep(0.25)
    raise RuntimeError(f"{url}{path} not ready:\n{log.read_text()[-3000:]}")


def production_server_flags() -> list[str]:
    """The flags ``make run`` gives uvicorn (the Makefile's ``UVICORN_LIMITS``: uvloop,
    httptools with the header limits, keep-alive), so the benchmark serves as production."""
    for line in (REPO / "Makefile").read_text().splitlines():
        if line.startswith("UVICORN_LIMITS ="):
            return line.split("=", 1)[1].split()
    raise RuntimeError("the Makefile defines no UVICORN_LIMITS")


@contextlib.contextmanager
def uvicorn_server(env: dict[str, str], tmp: Path, mode: str) -> Iterator[str]:
    """``uvicorn webplatform.asgi:application`` in ``env``, live for the block; its URL."""
    port = free_port()
    log = tmp / f"uvicorn-{mode}.log"
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "webplatform.asgi:application",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *production_server_flags(),
        "--lifespan",
        "off",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    url = f"http://127.0.0.1:{port}"
    with process(command, env, log) as proc:
        wait_ready(url, proc, log, path="/health/live")
        yield url
