"""``webplatform.completions.records``: served answers' records written in batches, each
request's deferred work returning once its own are in, and a failed connection retried."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from typing import Any

import pytest
from django.db import connection

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
    writer = RecordWriter(linger_s=1.0, write=batches)

    async def main() -> None:
        waits = [asyncio.create_task(writer.write(_records(f"r{i}"))) for i in range(3)]
        await asyncio.sleep(0.05)  # well within the linger: nothing written, nobody returned
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
    assert "a records write raised" in caplog.text


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


def test_closing_writes_what_is_queued_without_lingering_and_ends_the_thread() -> None:
    batches = _Batches()
    writer = RecordWriter(linger_s=30, write=batches)
    written: list[str] = []
    writer.put(_records("r0"), lambda: written.append("r0"))
    writer.put(_records("r1"), lambda: written.append("r1"))

    assert writer.close(timeout_s=10)
    assert batches.batches == [["r0", "r1"]] and written == ["r0", "r1"]


@pytest.mark.django_db(transaction=True)
def test_a_connection_that_failed_is_replaced_and_the_batch_written_once(
    owner, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = records.usage_records_create
    calls: list[int] = []

    def cut_first(batch: Sequence[UsageRecord]) -> list[UsageRecord]:
        calls.append(len(batch))
        if len(calls) == 1:  # the server ends this connection, as a restart of it would
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        return real(batch)

    monkeypatch.setattr(records, "usage_records_create", cut_first)
    records_write([_records("x-1", owner.tenant), _records("x-2", owner.tenant)])

    assert calls == [2, 2]
    assert sorted(UsageRecord.objects.values_list("request_id", flat=True)) == ["x-1", "x-2"]


@pytest.mark.django_db(transaction=True)
def test_a_bad_row_loses_no_other_requests_records(owner, caplog: pytest.LogCaptureFixture) -> None:
    from tenants.models import ContentLogEntry, Tenant
    from tenants.services.content_logging import ContentLogItem

    Tenant.objects.filter(pk=owner.tenant.pk).update(log_content=True)

    def with_text(request_id: str) -> RequestRecords:
        usage = _records(request_id, owner.tenant).usage
        return RequestRecords(usage, ContentLogItem(owner.tenant, request_id, "q", "a"))

    # Longer than the column: the batch's INSERT fails as a whole.
    batch = [with_text("ok-1"), with_text("x" * 100), with_text("ok-2")]
    with caplog.at_level(logging.ERROR, logger="webplatform.completions.records"):
        records_write(batch)

    assert sorted(UsageRecord.objects.values_list("request_id", flat=True)) == ["ok-1", "ok-2"]
    assert sorted(ContentLogEntry.objects.values_list("request_id", flat=True)) == [
        "ok-1",
        "ok-2",
    ]
    assert "writing the records of 1 requests failed (xxxx" in caplog.text


@pytest.mark.django_db(transaction=True)
def test_a_request_whose_usage_record_failed_leaves_no_content_log(owner, outsider) -> None:
    from tenants.models import ContentLogEntry, Tenant
    from tenants.services.content_logging import ContentLogItem

    Tenant.objects.filter(pk=owner.tenant.pk).update(log_content=True)
    records_write([_records("theirs", outsider.tenant)])  # the id is the outsider's

    def with_text(request_id: str) -> RequestRecords:
        usage = _records(request_id, owner.tenant).usage
        return RequestRecords(usage, ContentLogItem(owner.tenant, request_id, "q", "a"))

    records_write([with_text("mine"), with_text("theirs")])

    assert UsageRecord.objects.get(request_id="theirs").tenant_id == outsider.tenant.pk
    assert list(ContentLogEntry.objects.values_list("request_id", flat=True)) == ["mine"]
