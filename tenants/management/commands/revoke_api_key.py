from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from tenants.errors import ApplicationError
from tenants.selectors.api_keys import api_key_get_for_operator
from tenants.services.api_keys import api_key_revoke


class Command(BaseCommand):
    help = "Revoke an API key by its public id (the middle part of the key); immediate."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("public_id")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            api_key = api_key_get_for_operator(public_id=options["public_id"])
        except ApplicationError as error:
            raise CommandError(error.message) from error
        already = api_key.revoked_at is not None
        api_key_revoke(api_key=api_key)
        state = "was already revoked" if already else "revoked"
        self.stdout.write(
            f"Key {api_key.public_id} ({api_key.name}, {api_key.tenant.slug}) {state}."
        )
