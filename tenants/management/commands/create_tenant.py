from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from tenants.errors import ApplicationError
from tenants.selectors.tenants import plan_get_by_name
from tenants.services.tenants import plans_ensure_defaults, tenant_create, user_ensure


class Command(BaseCommand):
    help = "Create an organisation (tenant), optionally with an owner (created if missing)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="Display name, e.g. 'Acme Corp'")
        parser.add_argument("--plan", default="free", help="Plan name (default: free)")
        parser.add_argument("--slug", help="URL slug (default: from the name)")
        parser.add_argument("--owner-email", help="Owner's e-mail; the user is created if missing")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            plans_ensure_defaults()
            plan = plan_get_by_name(name=options["plan"])
            owner = None
            if options["owner_email"]:
                ensured = user_ensure(email=options["owner_email"])
                owner = ensured.user
                if ensured.created:
                    self.stdout.write(
                        f"Created user {owner.get_username()} without a password; set one "
                        f"with: python manage.py changepassword {owner.get_username()}"
                    )
            tenant = tenant_create(
                name=options["name"], plan=plan, owner=owner, slug=options["slug"]
            )
        except ApplicationError as error:
            raise CommandError(error.message) from error
        self.stdout.write(
            self.style.SUCCESS(
                f"Created tenant {tenant.name!r} (slug {tenant.slug}, id {tenant.pk}, "
                f"plan {plan.name})"
            )
        )
