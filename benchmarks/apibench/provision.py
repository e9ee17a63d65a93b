"""A tenant with generous limits and its API key, in a setup's database.

``provision`` (in the benchmark process) runs ``benchmarks/api.py provision`` in the setup's
environment; that subprocess calls ``provision_command``, which migrates the database,
creates the plan, tenant and key, and prints the raw key as the last line of its stdout.
"""

from __future__ import annotations

import json
import sys
import uuid

from .processes import REPO, run_checked

ENTRY = REPO / "benchmarks" / "api.py"


def provision(env: dict[str, str]) -> str:
    """Migrate the mode's database and create a tenant with generous limits; its raw key."""
    out = run_checked([sys.executable, str(ENTRY), "provision"], env)
    return json.loads(out.strip().splitlines()[-1])["key"]


def provision_command() -> None:
    """``benchmarks/api.py provision``: run inside a mode's environment (a subprocess)."""
    import django

    django.setup()
    from django.core.management import call_command

    from tenants.models import Plan
    from tenants.services.api_keys import api_key_create
    from tenants.services.tenants import tenant_create

    call_command("migrate", verbosity=0, interactive=False)
    plan = Plan.objects.create(
        name=f"bench-{uuid.uuid4().hex[:8]}",
        requests_per_minute=1_000_000,
        tokens_per_day=10**12,
        concurrent_requests=10_000,
        max_output_tokens=64,
    )
    tenant = tenant_create(name="Benchmark", plan=plan, slug=f"bench-{uuid.uuid4().hex[:8]}")
    print(json.dumps({"key": api_key_create(tenant=tenant, name="bench").raw_key}))
