"""Celery tasks of the dashboard: thin wrappers around services."""

from __future__ import annotations

from celery import shared_task

from tenants.services.content_logging import content_log_purge_expired


@shared_task
def content_log_purge_task() -> int:
    """Delete stored prompts and answers past retention; schedule it daily."""
    return content_log_purge_expired()
