"""``python manage.py inference_worker --model NAME``: the worker, kept for old deployments.

A thin wrapper over ``python -m inference.worker`` (``inference.worker.main``), the
documented command: same arguments, same settings (read from the environment, as the worker
does, not from Django's), only Django loaded around it for nothing.
"""

from __future__ import annotations

from typing import Any, NoReturn

from django.core.management.base import BaseCommand, CommandError

from inference.worker.main import main


class Command(BaseCommand):
    help = "Serve one model's inference requests from the Redis queue (python -m inference.worker)."
    # The worker uses no web code or database: a GPU host must not fail on their checks.
    requires_system_checks: list[str] = []

    def run_from_argv(self, argv: list[str]) -> NoReturn:
        # argv: [manage.py, inference_worker, ...]; the worker parses the rest itself.
        raise SystemExit(main(argv[2:]))

    def handle(self, *args: Any, **options: Any) -> None:
        raise CommandError("run it from the command line: python -m inference.worker --model NAME")
