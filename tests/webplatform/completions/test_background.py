"""``webplatform.completions.background``: tasks nobody awaits are held until done, and a
failure that is not a refusal is logged rather than lost."""

from __future__ import annotations

import asyncio
import logging

from tenants.errors import ApplicationError
from webplatform.completions import background as background_module
from webplatform.completions.background import background


async def _fail(exc: BaseException) -> None:
    await asyncio.sleep(0)
    raise exc


async def test_a_task_is_held_until_done_and_its_failure_logged(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="webplatform.completions.background")
    task = background(_fail(ConnectionError("redis gone")))
    assert task in background_module._background
    await asyncio.wait([task])
    await asyncio.sleep(0)  # the done callback
    assert task not in background_module._background
    assert "a background task of the request path failed" in caplog.text
    assert "redis gone" in caplog.text


async def test_a_refusal_is_an_outcome_not_logged_here(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="webplatform.completions.background")
    task = background(_fail(ApplicationError("refused", code="malware_detected")))
    await asyncio.wait([task])
    await asyncio.sleep(0)
    assert caplog.text == ""
