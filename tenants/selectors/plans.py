"""Which plans an organisation's owner may switch to on their own (self-serve).

``SELF_SERVE_PLANS`` (a setting; by default the two built-in plans, ``free`` and ``pro``)
names them. Any other plan (an enterprise contract an operator creates in the admin) is
assigned by an operator and never offered on the settings page.
"""

from __future__ import annotations

from django.conf import settings
from django.db.models import QuerySet

from tenants.models import Plan

DEFAULT_SELF_SERVE_PLANS = ("free", "pro")


def self_serve_plan_names() -> tuple[str, ...]:
    return tuple(getattr(settings, "SELF_SERVE_PLANS", DEFAULT_SELF_SERVE_PLANS))


def plan_is_self_serve(plan: Plan) -> bool:
    return plan.name in self_serve_plan_names()


def plan_list_self_serve() -> QuerySet[Plan]:
    return Plan.objects.filter(name__in=self_serve_plan_names()).order_by(
        "requests_per_minute", "name"
    )
