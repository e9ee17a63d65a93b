"""Content logging: what settling a request stores, for how long, and the organisation's switch."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tenants.errors import ApplicationError
from tenants.models import AuditLogEntry, ContentLogEntry, Tenant
from tenants.selectors.content_logging import (
    DEFAULT_RETENTION_DAYS,
    content_log_by_request,
    content_retention_days_get,
)
from tenants.services.content_logging import (
    MAX_STORED_CHARS,
    ContentLogItem,
    content_log_purge_expired,
    content_log_record,
    content_logging_update,
    content_logs_record,
)

pytestmark = pytest.mark.django_db

NOW = datetime(2030, 1, 2, 12, 0, tzinfo=UTC)


def _record(tenant: Tenant, request_id: str = "req-1", **fields):  # type: ignore[no-untyped-def]
    values = {"prompt": "What is 2+2?", "answer": "4", "now": NOW, **fields}
    return content_log_record(tenant=tenant, request_id=request_id, **values)


def test_nothing_is_kept_for_an_organisation_that_does_not_log_content(owner):
    assert _record(owner.tenant) is None
    assert not ContentLogEntry.objects.exists()


def test_the_switch_is_read_from_the_database_not_from_the_callers_copy(owner):
    """The completion path passes the tenant of the cached API key record: switching logging
    off must stop storing at once, whatever that copy says."""
    stale = Tenant.objects.get(pk=owner.tenant.pk)
    stale.log_content = True
    assert _record(stale) is None

    Tenant.objects.filter(pk=owner.tenant.pk).update(log_content=True)
    owner.tenant.log_content = False
    assert _record(owner.tenant) is not None


def test_a_kept_request_expires_after_the_retention_period_once_per_request(owner):
    content_logging_update(tenant=owner.tenant, enabled=True, retention_days=7, actor=owner.user)

    entry = _record(owner.tenant, prompt="Q" * (MAX_STORED_CHARS + 10))
    again = _record(owner.tenant, answer="another answer")

    assert entry is not None and again is not None and again.pk == entry.pk
    assert entry.expires_at == NOW + timedelta(days=7)
    assert len(entry.prompt) == MAX_STORED_CHARS
    assert ContentLogEntry.objects.filter(tenant=owner.tenant).count() == 1


def test_the_default_retention_applies_until_one_is_set(owner):
    Tenant.objects.filter(pk=owner.tenant.pk).update(log_content=True)

    assert content_retention_days_get(tenant=owner.tenant) == DEFAULT_RETENTION_DAYS
    assert _record(owner.tenant).expires_at == NOW + timedelta(days=DEFAULT_RETENTION_DAYS)


def test_purge_deletes_only_what_has_expired(owner, outsider):
    for persona, days in ((owner, 1), (outsider, 10)):
        content_logging_update(
            tenant=persona.tenant, enabled=True, retention_days=days, actor=persona.user
        )
        _record(persona.tenant)

    assert content_log_purge_expired(now=NOW + timedelta(days=2)) == 1
    assert list(ContentLogEntry.objects.values_list("tenant_id", flat=True)) == [outsider.tenant.pk]


def test_a_reader_sees_only_its_organisations_unexpired_entries(owner, outsider):
    for persona in (owner, outsider):
        content_logging_update(
            tenant=persona.tenant, enabled=True, retention_days=7, actor=persona.user
        )
        _record(persona.tenant, now=datetime.now(UTC))
    _record(owner.tenant, request_id="old", now=datetime.now(UTC) - timedelta(days=8))

    found = content_log_by_request(tenant=owner.tenant, request_ids=["req-1", "old"])

    assert list(found) == ["req-1"]
    assert found["req-1"].tenant_id == owner.tenant.pk


def test_switching_off_deletes_what_was_kept_and_is_audited_once(owner):
    content_logging_update(tenant=owner.tenant, enabled=True, retention_days=7, actor=owner.user)
    _record(owner.tenant)
    content_logging_update(tenant=owner.tenant, enabled=True, retention_days=7, actor=owner.user)

    content_logging_update(tenant=owner.tenant, enabled=False, retention_days=7, actor=owner.user)

    assert not ContentLogEntry.objects.exists()
    assert not Tenant.objects.get(pk=owner.tenant.pk).log_content
    changes = AuditLogEntry.objects.filter(action=AuditLogEntry.Action.CONTENT_LOGGING_CHANGED)
    assert [entry.target for entry in changes.order_by("id")] == ["on", "off"]


@pytest.mark.parametrize("days", [0, 366])
def test_retention_outside_one_day_to_a_year_is_refused(owner, days):
    with pytest.raises(ApplicationError) as refused:
        content_logging_update(
            tenant=owner.tenant, enabled=True, retention_days=days, actor=owner.user
        )
    assert (refused.value.code, refused.value.param) == ("invalid_value", "retention_days")
    assert not Tenant.objects.get(pk=owner.tenant.pk).log_content


def test_many_requests_are_kept_only_for_organisations_that_log_content(owner, outsider):
    Tenant.objects.filter(pk=owner.tenant.pk).update(log_content=True)
    items = [
        ContentLogItem(owner.tenant, "a", "question a", "answer a"),
        ContentLogItem(outsider.tenant, "b", "question b", "answer b"),  # does not log
        ContentLogItem(owner.tenant, "c", "q" * (MAX_STORED_CHARS + 5), "answer c"),
    ]
    # The caller's copy of the tenant says "off": the switch is read from the database.
    assert owner.tenant.log_content is False

    with CaptureQueriesContext(connection) as queries:
        content_logs_record(items, now=NOW)
    content_logs_record(items[:1], now=NOW)  # again: already kept, skipped

    # Whether any logs; then, in a transaction (a savepoint in the test's), the logging
    # organisations' rows locked with their retention, and one INSERT.
    sql = [q["sql"] for q in queries.captured_queries]
    assert [statement.split()[0] for statement in sql] == [
        "SELECT",
        "SAVEPOINT",
        "SELECT",
        "INSERT",
        "RELEASE",
    ]
    assert "FOR NO KEY UPDATE OF" in sql[2]
    kept = {e.request_id: e for e in ContentLogEntry.objects.all()}
    assert set(kept) == {"a", "c"}
    assert kept["a"].tenant_id == owner.tenant.pk and kept["a"].answer == "answer a"
    assert len(kept["c"].prompt) == MAX_STORED_CHARS
    assert kept["a"].expires_at == NOW + timedelta(days=DEFAULT_RETENTION_DAYS)


def test_a_batch_of_organisations_that_do_not_log_costs_one_read(
    owner, outsider, django_assert_num_queries
):
    items = [ContentLogItem(t, "r", "q", "a") for t in (owner.tenant, outsider.tenant)]
    with django_assert_num_queries(1):
        content_logs_record(items, now=NOW)
    with django_assert_num_queries(0):
        content_logs_record([], now=NOW)
    assert not ContentLogEntry.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_switch_off_in_progress_is_waited_for_and_then_nothing_is_kept(owner):
    """Turning logging off updates the organisation's row and deletes what was kept in one
    transaction; a batch being written meanwhile waits for it on the row's lock and then
    finds logging off. Without the lock it would read the old "on" and keep the text after
    the deletion."""
    import threading

    from django.db import connections, transaction

    Tenant.objects.filter(pk=owner.tenant.pk).update(log_content=True)
    locked, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def switching_off() -> None:
        try:
            with transaction.atomic():
                Tenant.objects.filter(pk=owner.tenant.pk).update(log_content=False)
                locked.set()
                assert release.wait(10)
        except BaseException as exc:  # reported by the test's thread
            errors.append(exc)
        finally:
            connections.close_all()

    def writing() -> None:
        try:
            content_logs_record([ContentLogItem(owner.tenant, "r", "q", "a")], now=NOW)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    switch = threading.Thread(target=switching_off)
    switch.start()
    assert locked.wait(10)
    writer = threading.Thread(target=writing)
    writer.start()
    writer.join(0.5)
    assert writer.is_alive()  # waiting on the organisation's row
    release.set()
    switch.join(10)
    writer.join(10)
    assert not errors and not writer.is_alive()
    assert not ContentLogEntry.objects.exists()
