"""Celery tasks: thin wrappers that call a service and retry."""

from __future__ import annotations

from datetime import date, timedelta
from typing import TYPE_CHECKING

from celery import shared_task
from django.db import DatabaseError
from django.utils import timezone

from tenants.services.usage import usage_rollup_day

if TYPE_CHECKING:
    from celery import Task


@shared_task(bind=True, max_retries=3, default_retry_delay=60)
def usage_rollup_day_task(self: Task[[str | None], int], day: str | None = None) -> int:
    """Roll up one UTC day (ISO date), by default yesterday; schedule it daily after 00:05."""
    target = date.fromisoformat(day) if day else timezone.now().date() - timedelta(days=1)
    try:
        return usage_rollup_day(day=target)
    except DatabaseError as error:
        raise self.retry(exc=error) from error
