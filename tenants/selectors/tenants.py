"""Tenants, memberships, plans and the limits a tenant runs under."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.models import AnonymousUser, User
from django.db.models import QuerySet

from tenants.errors import ApplicationError
from tenants.models import Membership, Plan, Tenant
from tenants.principals import ApiPrincipal, EffectiveLimits


def served_model_names() -> tuple[str, ...]:
    """Served model names, in the order of settings.INFERENCE_MODELS."""
    return tuple(settings.INFERENCE_MODELS)


def tenant_limits_get(*, tenant: Tenant) -> EffectiveLimits:
    """The tenant's effective limits. Reads ``tenant.plan`` (select it with the tenant)."""
    plan: Plan = tenant.plan

    def pick(override: int | None, default: int) -> int:
        return default if override is None else override

    served = served_model_names()
    plan_models = set(plan.allowed_models or served)
    return EffectiveLimits(
        requests_per_minute=pick(tenant.requests_per_minute_override, plan.requests_per_minute),
        tokens_per_day=pick(tenant.tokens_per_day_override, plan.tokens_per_day),
        concurrent_requests=pick(tenant.concurrent_requests_override, plan.concurrent_requests),
        max_image_bytes=pick(tenant.max_image_bytes_override, plan.max_image_bytes),
        max_output_tokens=pick(tenant.max_output_tokens_override, plan.max_output_tokens),
        allowed_models=tuple(name for name in served if name in plan_models),
        fallback_model=plan.fallback_model or None,
        default_model=plan.default_model or None,
    )


def tenant_find(*, reference: str) -> Tenant | None:
    """An operator's lookup (management commands): a tenant by slug, or by id if numeric."""
    queryset = Tenant.objects.select_related("plan")
    tenant = queryset.filter(slug=reference).first()
    if tenant is None and reference.isdigit():
        tenant = queryset.filter(pk=int(reference)).first()
    return tenant


def tenant_get_by_reference(*, reference: str) -> Tenant:
    """Like ``tenant_find`` but a missing tenant is an error (404 ``tenant_not_found``)."""
    tenant = tenant_find(reference=reference)
    if tenant is None:
        raise ApplicationError(
            f"No tenant with slug or id {reference!r}.", code="tenant_not_found", status=404
        )
    return tenant


def tenant_list_for_user(*, user: User) -> QuerySet[Tenant]:
    return Tenant.objects.filter(memberships__user=user).select_related("plan")


def tenant_get(*, tenant_id: int) -> Tenant | None:
    """The organisation with this id and its plan, read afresh; None when there is none."""
    return Tenant.objects.select_related("plan").filter(pk=tenant_id).first()


def membership_get(*, tenant_id: int, user: User | AnonymousUser) -> Membership | None:
    """The membership of ``user`` in organisation ``tenant_id``, or None.

    None means "not a member here" and does not say why: the organisation does not exist,
    the user is not in it, or the user is anonymous or deactivated (neither of the last two
    queries the database). The dashboard answers all of them with the same 404, so a
    stranger cannot tell which organisations exist. A membership comes with its tenant, the
    tenant's plan and its user: acting for the organisation costs no further query.
    """
    if not user.is_authenticated or not user.is_active:
        return None
    return (
        Membership.objects.select_related("tenant__plan", "user")
        .filter(tenant_id=tenant_id, user=user)
        .first()
    )


def membership_list_for_tenant(*, tenant: Tenant) -> QuerySet[Membership]:
    return Membership.objects.filter(tenant=tenant).select_related("user")


def membership_get_for_tenant(*, tenant: Tenant, membership_id: int) -> Membership:
    """One of the tenant's memberships; another tenant's is reported as missing (404)."""
    membership = (
        Membership.objects.select_related("user", "tenant")
        .filter(tenant=tenant, pk=membership_id)
        .first()
    )
    if membership is None:
        raise ApplicationError("No such member.", code="not_found", status=404)
    return membership


def memberships_of_user(*, user: User) -> QuerySet[Membership]:
    """Every organisation the user belongs to (the organisation switcher), by name."""
    return Membership.objects.filter(user=user).select_related("tenant").order_by("tenant__name")


def plan_list() -> QuerySet[Plan]:
    return Plan.objects.order_by("requests_per_minute", "name")


def plan_get_by_name(*, name: str) -> Plan:
    plan = Plan.objects.filter(name=name).first()
    if plan is None:
        names = ", ".join(Plan.objects.values_list("name", flat=True)) or "none"
        raise ApplicationError(
            f"No plan named {name!r} (plans: {names}).", code="plan_not_found", status=404
        )
    return plan


def member_principal_get(*, tenant: Tenant, user: User) -> ApiPrincipal:
    """The principal for a signed-in member acting for ``tenant`` (the playground).

    Refuses (403 ``insufficient_permissions``) a user who is not a member of the tenant (or
    is not active: see ``membership_get``).
    """
    if membership_get(tenant_id=tenant.pk, user=user) is None:
        raise ApplicationError(
            "You are not a member of this organisation.",
            code="insufficient_permissions",
            status=403,
        )
    return ApiPrincipal(tenant=tenant, limits=tenant_limits_get(tenant=tenant), user=user)
