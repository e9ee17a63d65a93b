from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from tenants.errors import ApplicationError
from tenants.models import ApiKey
from tenants.selectors.tenants import tenant_get_by_reference
from tenants.services.api_keys import api_key_create


class Command(BaseCommand):
    help = (
        "Create an API key for a tenant and print the key alone on stdout (it is shown "
        "once: the platform keeps only a hash), e.g. KEY=$(python manage.py create_api_key "
        "acme --name ci)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("tenant", help="Tenant slug or id")
        parser.add_argument("--name", required=True, help="What the key is for")
        parser.add_argument(
            "--scope-models",
            nargs="+",
            default=[],
            metavar="MODEL",
            help="Served models the key may use (default: all the plan allows)",
        )
        parser.add_argument(
            "--read-only", action="store_true", help="GET endpoints only (no completions)"
        )
        parser.add_argument("--expires-days", type=int, help="Expire after N days")

    def handle(self, *args: Any, **options: Any) -> None:
        expires_days = options["expires_days"]
        if expires_days is not None and expires_days < 1:
            raise CommandError("--expires-days must be at least 1")
        models = [m for value in options["scope_models"] for m in value.split(",") if m]
        try:
            tenant = tenant_get_by_reference(reference=options["tenant"])
            created = api_key_create(
                tenant=tenant,
                name=options["name"],
                allowed_models=models,
                access=ApiKey.Access.READ if options["read_only"] else ApiKey.Access.FULL,
                expires_at=timezone.now() + timedelta(days=expires_days) if expires_days else None,
            )
        except ApplicationError as error:
            raise CommandError(error.message) from error
        self.stderr.write(
            f"Created key {created.api_key.public_id} for {tenant.slug}; it is shown once:"
        )
        self.stdout.write(created.raw_key)
