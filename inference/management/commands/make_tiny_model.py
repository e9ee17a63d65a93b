"""``python manage.py make_tiny_model DIR``: write the tiny GLM-4.6V-style test checkpoint.

A thin wrapper over ``inference.tiny_model.build_tiny_model`` (which needs no Django).
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser


class Command(BaseCommand):
    help = "Write a tiny randomly initialised GLM-4.6V-architecture checkpoint into DIR."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("directory", help="output folder (created if missing)")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument(
            "--train-steps",
            type=int,
            default=None,
            help="text-model training steps on the built-in corpus (0: purely random)",
        )
        parser.add_argument(
            "--init-std", type=float, default=None, help="weight init std (config default 0.02)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        from inference.tiny_model import build_tiny_model

        kwargs: dict[str, Any] = {"seed": options["seed"]}
        if options["init_std"] is not None:
            kwargs["init_std"] = options["init_std"]
        if options["train_steps"] is not None:
            kwargs["train_steps"] = options["train_steps"]
        path = build_tiny_model(options["directory"], **kwargs)
        self.stdout.write(self.style.SUCCESS(f"tiny model written to {path}"))
