"""A served answer's usage record and content log, written in batches after the response.

Settlement (``webplatform.completions.settlement``) hands a request's records to
``RecordWriter.write`` when its entry point defers them past the response (REST, through
``webplatform.after_response``). One writer thread per process takes what arrives, lets
more gather for ``LINGER_S`` (or until ``MAX_BATCH``), then writes the batch
(``records_write``): the usage records in one INSERT, which of their organisations log
content in one read, the content logs in one INSERT. Each request's deferred work awaits
its batch, so a request still counts as in flight until its records are in, and a graceful
shutdown waits for them as before.

Why: written alone, right after its response, a request's records took ~2.3 ms of the web
process's CPU (most of it Python holding the GIL) and 0.7 ms of PostgreSQL's, while the
same client's next request was being authenticated and validated; moved out of that
moment, one client's answers came ~2 ms sooner on this project's CPU benchmark, and many
requests share a statement's round trip (docs/benchmarks.md, "Where a request's CPU goes;
usage records in batches").

Requests not deferred (Django's test client, a websocket consumer, an error's record,
which must be in before its response) write theirs at once with ``records_write``.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from django.db import InterfaceError, OperationalError, connections

from tenants.models import UsageRecord
from tenants.services.content_logging import ContentLogItem, content_logs_record
from tenants.services.usage import usage_records_create

logger = logging.getLogger(__name__)

# How long the first record of a batch waits for others: long enough that a busy process
# writes many requests per statement, short enough that usage pages and exports are current.
LINGER_S = 0.02
MAX_BATCH = 200


@dataclass(frozen=True)
class RequestRecords:
    """What one request leaves in the database: its usage record (built, not saved) and,
    for a served answer, its text for the content log (kept only if the organisation logs
    content)."""

    usage: UsageRecord
    content: ContentLogItem | None = None


def records_write(batch: Sequence[RequestRecords]) -> bool:
    """Write a batch's records; never raises (a failure is logged). A connection that
    failed (PostgreSQL restarted, a network cut) is replaced and the batch written once
    more; a batch that fails otherwise (one bad row fails its whole INSERT) is written one
    request at a time, so that one request's failure loses no other's records, until the
    database is found unreachable. False when the database could not be reached."""
    _renew_connection_if_due()
    try:
        _write_reconnecting(batch)
        return True
    except (InterfaceError, OperationalError):
        connections.close_all()
        _log_failure(batch)
        return False
    except Exception:
        if len(batch) == 1:
            _log_failure(batch)
            return True
    for done, records in enumerate(batch):
        if not records_write([records]):  # gone meanwhile: not 2 tries each
            if batch[done + 1 :]:
                _log_failure(batch[done + 1 :])
            return False
    return True


def _write_reconnecting(batch: Sequence[RequestRecords]) -> None:
    try:
        _write(batch)
    except (InterfaceError, OperationalError):
        connections.close_all()  # this thread's: the next use connects again
        _write(batch)


def _write(batch: Sequence[RequestRecords]) -> None:
    failed = {id(record) for record in usage_records_create([r.usage for r in batch])}
    # No content log for a request whose usage record could not be written (as before).
    content_logs_record(
        [r.content for r in batch if r.content is not None and id(r.usage) not in failed]
    )


def _renew_connection_if_due() -> None:
    """What ``close_old_connections`` does for a request, for the writer's long-lived
    thread, without its health check at every batch: a connection past
    ``CONN_MAX_AGE``, or unusable after an error, is closed (the next query connects)."""
    for conn in connections.all(initialized_only=True):
        if conn.connection is not None and (
            conn.errors_occurred
            or (conn.close_at is not None and time.monotonic() >= conn.close_at)
        ):
            conn.close_if_unusable_or_obsolete()


def _log_failure(batch: Sequence[RequestRecords]) -> None:
    logger.exception(
        "writing the records of %d requests failed (%s)",
        len(batch),
        ", ".join(r.usage.request_id for r in batch[:5]),
    )


class RecordWriter:
    """Batches ``RequestRecords`` on a thread of its own (started at the first write)."""

    def __init__(
        self,
        *,
        linger_s: float = LINGER_S,
        max_batch: int = MAX_BATCH,
        write: Callable[[Sequence[RequestRecords]], object] = records_write,
    ) -> None:
        self.linger_s = linger_s
        self.max_batch = max_batch
        self._write = write
        self._cond = threading.Condition()
        self._pending: list[tuple[RequestRecords, Callable[[], None]]] = []
        self._thread: threading.Thread | None = None
        self._closing = False

    async def write(self, records: RequestRecords) -> None:
        """Return once ``records`` are written (or their write failed, logged). Cancelling
        the caller does not take them back."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def written() -> None:
            loop.call_soon_threadsafe(_resolve, done)

        self.put(records, written)
        await asyncio.shield(done)

    def put(self, records: RequestRecords, written: Callable[[], None]) -> None:
        """Queue ``records``; ``written`` is called on the writer thread once its batch is
        written. The thread is woken by a batch's first record and by a full batch only:
        the others join while it lingers."""
        with self._cond:
            self._pending.append((records, written))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="usage-records", daemon=True)
                self._thread.start()
            if len(self._pending) in (1, self.max_batch):
                self._cond.notify()

    def close(self, timeout_s: float = 10.0) -> bool:
        """Write what is queued now, without lingering, and stop the thread; False when it
        did not finish within ``timeout_s``. At the process's exit (``record_writer``):
        records a request no longer waits for (a stop that timed out cancels it) are still
        written."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is None:
            return True
        thread.join(timeout_s)
        return not thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:  # closing, and all written
                    return
                deadline = time.monotonic() + self.linger_s
                while len(self._pending) < self.max_batch and not self._closing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
            try:
                self._write([records for records, _ in batch])
            except Exception:  # records_write does not raise; another write function might
                logger.exception("a records write raised")
            finally:
                for _, written in batch:
                    try:
                        written()
                    except Exception:  # its event loop closed meanwhile: nobody waits
                        logger.debug("a records waiter is gone", exc_info=True)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


_writer: RecordWriter | None = None
_writer_lock = threading.Lock()


def record_writer() -> RecordWriter:
    """This process's writer."""
    global _writer
    with _writer_lock:
        if _writer is None:
            _writer = RecordWriter()
            atexit.register(_writer.close)
        return _writer
