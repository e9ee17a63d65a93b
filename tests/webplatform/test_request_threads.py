"""The threads HTTP requests run their thread-sensitive work on (``webplatform.request_threads``):
lent, given back and reused; never lent while a finished request's work still runs on it;
retired past the pool's size; a request's database connection closed when it ends, as
when its thread ended with it; and, through the platform's ASGI handler, no thread started
for a request once the pool holds one."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
import pytest
from django.core.signals import request_started
from django.db import connections

from webplatform.middleware import PlatformAsgiHandler
from webplatform.request_threads import RequestThreads


class ThreadStarts:
    """The threads started while ``counting`` is on (``threading.Thread.start`` patched)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started: list[threading.Thread] = []
        self.counting = False
        original_start = threading.Thread.start

        def counting_start(thread: threading.Thread) -> None:
            if self.counting:
                self.started.append(thread)
            original_start(thread)

        monkeypatch.setattr(threading.Thread, "start", counting_start)


@pytest.fixture
def thread_starts(monkeypatch: pytest.MonkeyPatch) -> ThreadStarts:
    return ThreadStarts(monkeypatch)


def _thread_of(executor: Any) -> threading.Thread:
    return executor.submit(threading.current_thread).result(timeout=5)


def test_a_given_back_thread_is_lent_again() -> None:
    pool = RequestThreads(keep=4)
    first = pool.lend()
    thread = _thread_of(first)
    first.give_back()
    assert pool.idle() == 1
    again = pool.lend()
    assert again is first
    assert _thread_of(again) is thread
    assert pool.idle() == 0


def test_a_thread_still_running_a_finished_requests_work_is_not_lent() -> None:
    pool = RequestThreads(keep=4)
    executor = pool.lend()
    release = threading.Event()
    leftover = executor.submit(release.wait, 5)  # its awaiting task was cancelled, say
    executor.give_back()
    assert pool.idle() == 0
    other = pool.lend()
    assert other is not executor  # the next request does not queue behind the leftover
    assert _thread_of(other) is not None
    release.set()
    assert leftover.result(timeout=5) is True
    # Back in the pool once its work finished (the done callback runs on its thread).
    for _ in range(500):
        if pool.idle() == 1:
            break
        threading.Event().wait(0.01)
    assert pool.idle() == 1
    assert pool.lend() is executor


def test_past_the_pools_size_a_thread_ends() -> None:
    pool = RequestThreads(keep=1)
    kept, retired = pool.lend(), pool.lend()
    kept_thread, retired_thread = _thread_of(kept), _thread_of(retired)
    kept.give_back()
    retired.give_back()
    assert pool.idle() == 1
    retired_thread.join(timeout=5)
    assert not retired_thread.is_alive()
    assert kept_thread.is_alive()
    assert pool.lend() is kept


def test_an_executor_never_used_retires_without_a_thread(thread_starts: ThreadStarts) -> None:
    pool = RequestThreads(keep=0)
    executor = pool.lend()
    thread_starts.counting = True
    executor.give_back()  # a request that made no thread-sensitive call
    thread_starts.counting = False
    assert thread_starts.started == []


@pytest.mark.django_db(transaction=True)
def test_a_requests_database_connection_is_closed_when_its_thread_is_given_back() -> None:
    if connections["default"].vendor == "sqlite":
        pytest.skip("Django keeps an in-memory SQLite test database open on close()")
    pool = RequestThreads(keep=4)
    executor = pool.lend()

    def query() -> Any:
        connection = connections["default"]  # this thread's own
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return connection

    connection = executor.submit(query).result(timeout=5)
    assert connection.connection is not None
    executor.give_back()
    again = pool.lend()
    assert again is executor
    # Closed before the next request's first call runs on the thread.
    assert again.submit(lambda: connection.connection).result(timeout=5) is None
    assert again.submit(lambda: connections["default"] is connection).result(timeout=5)


def test_requests_through_the_handler_reuse_their_thread(thread_starts: ThreadStarts) -> None:
    seen: list[threading.Thread] = []

    def receiver(**_: Any) -> None:  # a sync receiver: Django runs it thread-sensitive
        seen.append(threading.current_thread())

    handler = PlatformAsgiHandler(RequestThreads(keep=4))

    async def send() -> list[int]:
        transport = httpx.ASGITransport(app=handler)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            # The first request makes the pool's thread (and this loop's own executors).
            statuses = [(await c.get("/health/live")).status_code]
            thread_starts.counting = True  # only while the five requests are served
            statuses += [(await c.get("/health/live")).status_code for _ in range(5)]
            thread_starts.counting = False
            return statuses

    request_started.connect(receiver)
    try:
        # A loop of its own, as under uvicorn (async_to_sync would make the test's thread
        # the requests' sync thread).
        assert asyncio.run(send()) == [200] * 6
    finally:
        request_started.disconnect(receiver)
    assert len(seen) == 6
    assert set(seen) == {seen[0]}  # every request's sync work on the one lent thread
    assert seen[0] is not threading.current_thread()
    assert thread_starts.started == []  # Django's own handler starts two per request
    assert handler.threads.idle() == 1
