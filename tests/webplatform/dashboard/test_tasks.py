"""Celery wiring: every scheduled task exists under the name the beat schedule sends, and the
content-log purge task deletes what has expired."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from tenants.models import ContentLogEntry
from tenants.services.content_logging import content_log_record, content_logging_update
from webplatform.celery import app


@pytest.fixture(autouse=True)
def _worker_imports() -> None:
    """Import what a worker imports at start (CELERY_IMPORTS, the apps' tasks modules)."""
    app.loader.import_default_modules()


def test_the_beat_schedule_sends_only_registered_tasks() -> None:
    scheduled = {entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values()}

    assert scheduled and scheduled <= set(app.tasks)


@pytest.mark.django_db
def test_the_purge_task_deletes_expired_content(owner) -> None:
    content_logging_update(tenant=owner.tenant, enabled=True, retention_days=1, actor=owner.user)
    content_log_record(
        tenant=owner.tenant,
        request_id="req-1",
        prompt="Q",
        answer="A",
        now=timezone.now() - timedelta(days=2),
    )
    task = app.tasks[settings.CELERY_BEAT_SCHEDULE["content-log-purge"]["task"]]

    assert task.apply().get() == 1
    assert not ContentLogEntry.objects.exists()
