"""The web process keeps freed memory for the next upload (``webplatform/asgi.py`` applies
``inference.allocator.keep_freed_memory`` with the web's ceiling): buffers of an upload's
sizes come back from malloc's heap instead of being faulted in anew every request."""

from __future__ import annotations

import sys

import pytest

from tests.fresh_interpreter import python_json, web_env

_UPLOADS = """
import json, resource, sys
if sys.argv[1] == "asgi":
    import webplatform.asgi  # noqa: F401  (what uvicorn imports)
def request():  # an upload's buffers: body, decoded bytes, image, pixels handed on
    held = [bytearray(800_000) for _ in range(8)]
    del held

request()  # the first one faults its pages in either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    request()
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_web_process_reuses_an_uploads_memory() -> None:
    env = web_env(drop_prefixes=("MALLOC_", "GLIBC_"))

    def faults(mode: str) -> int:
        return int(python_json(_UPLOADS, mode, env=env)["faults"])

    pages = 20 * 8 * 800_000 // 4096
    assert faults("bare") > pages // 2  # glibc's default: unmapped when freed, faulted again
    assert faults("asgi") < pages // 20


@pytest.mark.parametrize(
    "name", ["MALLOC_ARENA_MAX", "MALLOC_ARENA_TEST", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"]
)
def test_an_operators_malloc_settings_are_left_alone(name: str) -> None:
    from inference.allocator import WEB_ARENA_MAX, WEB_TRIM_THRESHOLD_BYTES, keep_freed_memory

    kept = keep_freed_memory(
        {name: "2"}, trim_threshold=WEB_TRIM_THRESHOLD_BYTES, arena_max=WEB_ARENA_MAX
    )
    assert kept is False
