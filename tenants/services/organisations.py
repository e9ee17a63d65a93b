"""Organisations as their members change them: create, change plan, delete.

Content logging, an organisation setting of its own, is ``tenants.services.content_logging``.
"""

from __future__ import annotations

from django.contrib.auth.models import User
from django.db import transaction
from django.utils.translation import gettext as _

from tenants.errors import ApplicationError
from tenants.models import AuditLogEntry, Plan, Tenant
from tenants.selectors.api_keys import api_key_list_for_tenant
from tenants.selectors.plans import plan_is_self_serve
from tenants.selectors.tenants import plan_get_by_name
from tenants.services.api_keys import api_key_revoke
from tenants.services.audit_log import audit_log_record
from tenants.services.tenants import plans_ensure_defaults, tenant_create

SIGN_UP_PLAN = "free"


@transaction.atomic
def organisation_create(*, name: str, owner: User) -> Tenant:
    """A new organisation on the free plan, owned by ``owner``."""
    plans_ensure_defaults()
    tenant = tenant_create(name=name, plan=plan_get_by_name(name=SIGN_UP_PLAN), owner=owner)
    audit_log_record(
        tenant=tenant,
        actor=owner,
        action=AuditLogEntry.Action.ORGANISATION_CREATED,
        target=tenant.name,
    )
    return tenant


@transaction.atomic
def organisation_plan_change(
    *, tenant: Tenant, plan: Plan, actor: User, self_serve: bool = True
) -> Tenant:
    """Switch ``tenant`` to ``plan``. ``self_serve`` (an owner on the dashboard): only a
    self-serve plan (``tenants.selectors.plans``), else 403 ``plan_not_self_serve``; an
    operator (the admin, a script) passes ``self_serve=False``."""
    if self_serve and not plan_is_self_serve(plan):
        raise ApplicationError(
            _("This plan is not self-serve: contact us to switch to it."),
            code="plan_not_self_serve",
            status=403,
            param="plan",
        )
    previous = tenant.plan.name
    if tenant.plan_id == plan.pk:
        return tenant
    Tenant.objects.filter(pk=tenant.pk).update(plan=plan)
    tenant.plan = plan
    audit_log_record(
        tenant=tenant,
        actor=actor,
        action=AuditLogEntry.Action.PLAN_CHANGED,
        target=plan.name,
        details={"from": previous, "to": plan.name},
    )
    return tenant


@transaction.atomic
def organisation_rename(*, tenant: Tenant, name: str, actor: User | None) -> Tenant:
    """Give the organisation a new display name (its id and slug stay); recorded in the
    audit log when it changes."""
    name = name.strip()
    if not name:
        raise ApplicationError(
            _("An organisation needs a name."), code="invalid_value", param="name"
        )
    previous = tenant.name
    if name == previous:
        return tenant
    Tenant.objects.filter(pk=tenant.pk).update(name=name)
    tenant.name = name
    audit_log_record(
        tenant=tenant,
        actor=actor,
        action=AuditLogEntry.Action.ORGANISATION_RENAMED,
        target=name,
        details={"from": previous, "to": name},
    )
    return tenant


@transaction.atomic
def organisation_delete(*, tenant: Tenant, actor: User) -> None:
    """Delete the organisation and everything it owns (keys, usage, members, logs).

    Its API keys are revoked first, so cached key records die at once on every process
    rather than at the end of their cache lifetime.
    """
    for api_key in api_key_list_for_tenant(tenant=tenant, include_revoked=False):
        api_key_revoke(api_key=api_key)
    Tenant.objects.filter(pk=tenant.pk).delete()
