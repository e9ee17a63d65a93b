"""Create the "free" and "pro" plans (values copied, as a migration must not import code that
later changes; ``tenants.services.tenants.plans_ensure_defaults`` holds the same defaults)."""

from django.db import migrations

FIVE_MB = 5 * 1024 * 1024

PLANS = {
    "free": {
        "requests_per_minute": 20,
        "tokens_per_day": 200_000,
        "concurrent_requests": 2,
        "max_image_bytes": FIVE_MB,
        "max_output_tokens": 1024,
    },
    "pro": {
        "requests_per_minute": 600,
        "tokens_per_day": 10_000_000,
        "concurrent_requests": 16,
        "max_image_bytes": 4 * FIVE_MB,
        "max_output_tokens": 8192,
    },
}


def create_plans(apps, schema_editor):
    Plan = apps.get_model("tenants", "Plan")
    for name, limits in PLANS.items():
        Plan.objects.get_or_create(name=name, defaults=limits)


class Migration(migrations.Migration):
    dependencies = [("tenants", "0001_initial")]

    operations = [migrations.RunPython(create_plans, migrations.RunPython.noop)]
