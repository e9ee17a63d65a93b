"""Tasks the request path starts and does not await: held until done (the event loop
keeps only weak references to its tasks), their outcome retrieved even when nobody awaits
it. A scan verdict read on after the request was decided (``validation``), a cancel sent
when a refusal interrupts a run (``streaming``), a lease given back that a cancelled
admission took (``admission``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from tenants.errors import ApplicationError

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

_background: set[asyncio.Task[Any]] = set()


def background(coroutine: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
    """``coroutine`` in a task held until done (the loop keeps only weak references to its
    tasks) whose outcome is retrieved even when nobody awaits it."""
    task = asyncio.ensure_future(coroutine)
    _background.add(task)
    task.add_done_callback(_background_done)
    return task


def _background_done(task: asyncio.Task[Any]) -> None:
    _background.discard(task)
    if task.cancelled():
        return
    failure = task.exception()
    # A refusal (a scan's verdict) is an outcome, logged where it is read; anything else
    # (a cancel that could not reach Redis) would otherwise go unseen.
    if failure is not None and not isinstance(failure, ApplicationError):
        logger.warning("a background task of the request path failed", exc_info=failure)
