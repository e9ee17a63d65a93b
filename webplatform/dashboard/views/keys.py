"""API keys: create (the full key shown once), list (redacted), revoke."""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.http import Http404, HttpResponse
from django.shortcuts import redirect
from django.utils.translation import gettext as _
from django.views.decorators.http import require_POST

from tenants.errors import ApplicationError
from tenants.models import ApiKey, Membership
from tenants.selectors.api_keys import api_key_get_for_tenant, api_key_list_for_tenant
from tenants.selectors.tenants import tenant_limits_get
from tenants.selectors.usage import KeyActivity, usage_by_key_for_tenant
from tenants.services.api_keys import (
    api_key_create_audited,
    api_key_rename_audited,
    api_key_revoke_audited,
)
from webplatform.dashboard.access import OrgRequest, org_view
from webplatform.dashboard.forms import ApiKeyForm, ApiKeyRenameForm
from webplatform.dashboard.views.common import form_error, render_page

NEW_KEY_SESSION_KEY = "dashboard_new_key"


def redacted(api_key: ApiKey) -> str:
    return f"{settings.API_KEY_PREFIX}_{api_key.public_id}_…"


@org_view(Membership.Role.ADMIN)
def keys(request: OrgRequest) -> HttpResponse:
    """Post/redirect/get: a created key's secret travels to the next GET in the session and
    is removed from it there, so a reload shows the list and creates nothing."""
    tenant = request.tenant
    models = tenant_limits_get(tenant=tenant).allowed_models
    form = ApiKeyForm(request.POST or None, models=models)
    status = 200
    if request.method == "POST":
        if form.is_valid():
            try:
                created = api_key_create_audited(
                    tenant=tenant,
                    name=form.cleaned_data["name"],
                    created_by=request.user,
                    allowed_models=form.cleaned_data["models"],
                    access=form.cleaned_data["access"],
                    expires_at=form.expires_at(),
                )
            except ApplicationError as error:
                form_error(form, error)
                status = 400
            else:
                request.session[NEW_KEY_SESSION_KEY] = {
                    "tenant_id": tenant.pk,
                    "public_id": created.api_key.public_id,
                    "name": created.api_key.name,
                    "raw_key": created.raw_key,
                }
                return redirect("dashboard:keys", tenant.pk)
        else:
            status = 400
    flashed = request.session.pop(NEW_KEY_SESSION_KEY, None)
    created_key = flashed if flashed and flashed.get("tenant_id") == tenant.pk else None
    activity = usage_by_key_for_tenant(tenant=tenant)
    rows = [
        {"key": k, "redacted": redacted(k), "activity": activity.get(k.pk, KeyActivity())}
        for k in api_key_list_for_tenant(tenant=tenant)
    ]
    response = render_page(
        request,
        "dashboard/keys.html",
        {"form": form, "created": created_key, "rows": rows, "models": models},
        status=status,
    )
    if created_key is not None:
        # The one response that carries the full key: keep it out of every cache.
        response["Cache-Control"] = "no-store"
    return response


@org_view(Membership.Role.ADMIN)
def key_revoke(request: OrgRequest, public_id: str) -> HttpResponse:
    tenant = request.tenant
    try:
        api_key = api_key_get_for_tenant(tenant=tenant, public_id=public_id)
    except ApplicationError as error:
        raise Http404(error.message) from error
    if request.method == "POST":
        api_key_revoke_audited(api_key=api_key, actor=request.user)
        messages.success(request, _("The key %(name)s was revoked.") % {"name": api_key.name})
        return redirect("dashboard:keys", tenant.pk)
    return render_page(
        request, "dashboard/key_revoke.html", {"key": api_key, "redacted": redacted(api_key)}
    )


@org_view(Membership.Role.ADMIN)
@require_POST
def key_rename(request: OrgRequest, public_id: str) -> HttpResponse:
    tenant = request.tenant
    try:
        api_key = api_key_get_for_tenant(tenant=tenant, public_id=public_id)
    except ApplicationError as error:
        raise Http404(error.message) from error
    form = ApiKeyRenameForm(request.POST)
    if form.is_valid():
        api_key_rename_audited(api_key=api_key, name=form.cleaned_data["name"], actor=request.user)
        messages.success(request, _("Key renamed to %(name)s.") % {"name": api_key.name})
    else:
        messages.error(request, _("A key needs a name (up to 100 characters)."))
    return redirect("dashboard:keys", tenant.pk)
