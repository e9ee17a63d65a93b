"""``webplatform.completions.records``: served answers' records written in batches, each
request's deferred work returning once its own are in, and a failed connection retried."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from typing import Any

import pytest
from django.db import OperationalError

import webplatform.completions.records as records
from tenants.models import UsageRecord
from tenants.services.usage import usage_record_build
from webplatform.completions.records import RecordWriter, RequestRecords, records_write


def _records(request_id: str, tenant: Any = None) -> RequestRecords:
    if tenant is None:  # enough for a writer that does not save
        return RequestRecords(usage=UsageRecord(request_id=request_id))
    usage = usage_record_build(
        tenant=tenant,
        request_id=request_id,
        channel=UsageRecord.Channel.REST,
        model="glm-4.6v-flash",
        status=UsageRecord.Status.OK,
    )
    return RequestRecords(usage=usage)


class _Batches:
    """A write function that keeps what it was given; ``gate`` holds it until set."""

    def __init__(self, *, fail: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail = fail

    def __call__(self, batch: Sequence[RequestRecords]) -> None:
        assert self.gate.wait(10)
        self.batches.append([r.usage.request_id for r in batch])
        if self.fail:
            raise RuntimeError("the database is on fire")


def test_records_arriving_together_are_one_batch_and_each_waits_for_it() -> None:
    batches = _Batches()
    writer = RecordWriter(linger_s=0.2, write=batches)

    async def main() -> None:
        waits = [asyncio.create_task(writer.write(_records(f"r{i}"))) for i in range(3)]
        await asyncio.sleep(0.05)  # within the linger: nothing written, nobody returned
        assert batches.batches == [] and not any(w.done() for w in waits)
        await asyncio.wait_for(asyncio.gather(*waits), 10)
        assert batches.batches == [["r0", "r1", "r2"]]
        # The next record starts a batch of its own.
        await asyncio.wait_for(writer.write(_records("r3")), 10)
        assert batches.batches == [["r0", "r1", "r2"], ["r3"]]

    asyncio.run(main())


def test_a_full_batch_is_written_without_waiting_for_the_linger() -> None:
    batches = _Batches()
    batches.gate.clear()
    writer = RecordWriter(linger_s=30, max_batch=2, write=batches)

    async def main() -> None:
        waits = [asyncio.create_task(writer.write(_records(f"r{i}"))) for i in range(5)]
        await asyncio.sleep(0.05)
        batches.gate.set()
        # Two full batches at once; the fifth record waits out its linger (30 s): not here.
        await asyncio.wait_for(asyncio.gather(*waits[:4]), 10)
        assert batches.batches == [["r0", "r1"], ["r2", "r3"]]
        assert not waits[4].done()
        waits[4].cancel()

    asyncio.run(main())


def test_a_failed_write_is_logged_and_its_waiters_still_return(
    caplog: pytest.LogCaptureFixture,
) -> None:
    writer = RecordWriter(linger_s=0.01, write=_Batches(fail=True))

    async def main() -> None:
        await asyncio.wait_for(writer.write(_records("r0")), 10)

    with caplog.at_level(logging.ERROR, logger="webplatform.completions.records"):
        asyncio.run(main())
    assert "writing the records of 1 requests failed" in caplog.text


def test_a_cancelled_waiter_does_not_take_its_records_back() -> None:
    batches = _Batches()
    batches.gate.clear()
    writer = RecordWriter(linger_s=0.01, write=batches)

    async def main() -> None:
        waiting = asyncio.create_task(writer.write(_records("r0")))
        await asyncio.sleep(0.05)
        waiting.cancel()  # the client went away, or the server shuts its task down
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(main())
    batches.gate.set()
    for _ in range(1000):
        if batches.batches:
            break
        threading.Event().wait(0.01)
    assert batches.batches == [["r0"]]


@pytest.mark.django_db(transaction=True)
def test_a_connection_that_failed_is_replaced_and_the_batch_written_once(
    owner, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = records.usage_records_create
    calls: list[int] = []

    def flaky(batch: Sequence[UsageRecord]) -> None:
        calls.append(len(batch))
        if len(calls) == 1:
            raise OperationalError("server closed the connection unexpectedly")
        real(batch)

    monkeypatch.setattr(records, "usage_records_create", flaky)
    records_write([_records("x-1", owner.tenant), _records("x-2", owner.tenant)])

    assert calls == [2, 2]
    assert sorted(UsageRecord.objects.values_list("request_id", flat=True)) == ["x-1", "x-2"]
