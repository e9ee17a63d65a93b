"""The thread each HTTP request runs its thread-sensitive work on, lent from a pool.

Django runs every ASGI request inside asgiref's ``ThreadSensitiveContext``: all of the
request's ``sync_to_async(thread_sensitive=True)`` calls (Django's ``request_started`` and
``request_finished`` receivers, DRF's authentication in adrf's ``initial``, a sync view or
middleware hook, ``response.close``) run on one thread of the request's own. Given no
executor, asgiref makes that thread on the request's first such call and, when the request
ends, starts one more thread to join it: two thread starts per request, each blocking the
event loop until the new thread runs (docs/benchmarks.md, "Request threads").

``RequestThreads`` lends each request a single-thread executor (asgiref's
``ThreadSensitiveContext(executor=...)``, made for this) and takes it back when the request
ends. The guarantees stay Django's: all of a request's thread-sensitive work on one
thread, never two requests on one thread at once. An executor still running work when its
request ends (a sync call keeps running when the task that awaited it is cancelled: a
thread cannot be interrupted) is lent again only once that work finished, so no request
waits behind another's leftovers. At most ``keep`` idle executors are kept; one more is
retired (its thread ends).

Database connections stay as they were: Django keeps one per thread, and a request's is
closed when it is given back (``connections.close_all`` queued on its thread, ahead of any
later request's work), as it was when its thread ended with it. Idle threads hold none, so
the pool's size does not count against PostgreSQL's connections.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

from django.db import connections

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

# Idle threads kept per web process: an idle thread costs its stack and nothing else, and a
# burst of more concurrent requests than this starts threads again.
IDLE_THREADS_KEPT = 32


class RequestThread(ThreadPoolExecutor):
    """A one-thread executor that knows whether work is still queued or running on it."""

    def __init__(self, pool: RequestThreads) -> None:
        super().__init__(max_workers=1, thread_name_prefix="request")
        self._pool = pool
        self._lock = threading.Lock()
        self._in_flight = 0
        self._used = False
        self._given_back = False  # the request ended with work in flight: back once idle

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        with self._lock:
            self._in_flight += 1
            self._used = True
        try:
            future = super().submit(fn, *args, **kwargs)
        except BaseException:
            with self._lock:
                self._in_flight -= 1
            raise
        future.add_done_callback(self._work_done)
        return future

    def _work_done(self, _future: Future[Any]) -> None:
        with self._lock:
            self._in_flight -= 1
            back = self._given_back and self._in_flight == 0
            if back:
                self._given_back = False
        if back:
            self._pool.take_back(self)

    def give_back(self) -> None:
        """The request ended: its database connections closed on its thread, then back to
        the pool now, or when its last work has finished."""
        if self._used:
            # Queued first, while nothing can retire this executor yet (it is neither in
            # the pool nor marked given back), and not counted as work in flight: it runs
            # before any later request's work (one thread, first in, first out).
            super().submit(_close_connections)
        with self._lock:
            busy = self._in_flight > 0
            if busy:
                self._given_back = True
        if not busy:
            self._pool.take_back(self)

    def retire(self) -> None:
        """End the thread once its queued work is done, without waiting for it."""
        self.shutdown(wait=False)


def _close_connections() -> None:
    try:
        connections.close_all()
    except Exception:  # the next request's close_old_connections tries again
        logger.exception("closing a request thread's database connections failed")


class RequestThreads:
    """The pool: ``lend`` at a request's start, ``RequestThread.give_back`` at its end."""

    def __init__(self, *, keep: int = IDLE_THREADS_KEPT) -> None:
        self.keep = keep
        self._idle: list[RequestThread] = []  # last in, first out: the warmest thread first
        self._lock = threading.Lock()

    def lend(self) -> RequestThread:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return RequestThread(self)

    def take_back(self, executor: RequestThread) -> None:
        with self._lock:
            if len(self._idle) < self.keep:
                self._idle.append(executor)
                return
        executor.retire()

    def idle(self) -> int:
        """How many idle executors the pool holds."""
        with self._lock:
            return len(self._idle)
