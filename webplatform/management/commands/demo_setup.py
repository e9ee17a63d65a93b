"""``make run`` calls this: a demo organisation and a fresh demo key, printed once."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from tenants.models import Membership
from tenants.selectors.api_keys import api_key_list_for_tenant
from tenants.selectors.tenants import plan_get_by_name, tenant_find
from tenants.services.api_keys import api_key_create, api_key_revoke
from tenants.services.tenants import (
    membership_create,
    plans_ensure_defaults,
    tenant_create,
    user_ensure,
)

DEMO_SLUG = "demo"
DEMO_KEY_NAME = "demo"
DEMO_OWNER_EMAIL = "demo@example.com"


class Command(BaseCommand):
    help = (
        "Create the 'Demo' organisation (free plan) if missing, revoke the previous demo key, "
        "create a new one and print it with a curl example. Safe to run again."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", default="8000")

    def handle(self, *args: Any, **options: Any) -> None:
        plans_ensure_defaults()
        tenant = tenant_find(reference=DEMO_SLUG)
        owner = user_ensure(email=DEMO_OWNER_EMAIL)
        if tenant is None:
            tenant = tenant_create(
                name="Demo", slug=DEMO_SLUG, plan=plan_get_by_name(name="free"), owner=owner.user
            )
        else:
            membership_create(tenant=tenant, user=owner.user, role=Membership.Role.OWNER)
        for old_key in api_key_list_for_tenant(tenant=tenant, include_revoked=False).filter(
            name=DEMO_KEY_NAME
        ):
            api_key_revoke(api_key=old_key)
        created = api_key_create(tenant=tenant, name=DEMO_KEY_NAME, created_by=owner.user)

        base = f"http://{options['host']}:{options['port']}"
        username = owner.user.get_username()
        lines = [
            "",
            "=" * 72,
            f" Demo organisation '{tenant.name}' ({tenant.slug}), plan {tenant.plan.name}",
            f" Site:          {base}/",
            f" Admin:         {base}/admin/  (python manage.py createsuperuser)",
            f" Demo owner:    {username}  (set a password: python manage.py changepassword {username})",
            f" OpenAI base:   {base}/v1",
            f" API key:       {created.raw_key}",
            "                (new on every run; the previous demo key is now revoked)",
            "",
            " Try it:",
            f'   curl -s {base}/v1/models -H "Authorization: Bearer {created.raw_key}"',
            "=" * 72,
            "",
        ]
        self.stdout.write("\n".join(lines))
