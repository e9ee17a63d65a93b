"""Home, organisation create/switch, overview, settings (plan, content logging), delete."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, HttpResponsePermanentRedirect
from django.shortcuts import redirect
from django.templatetags.static import static
from django.utils.translation import gettext as _
from django.views.decorators.http import require_POST

from tenants.errors import ApplicationError
from tenants.models import Membership
from tenants.selectors.content_logging import content_retention_days_get
from tenants.selectors.onboarding import onboarding_for_tenant
from tenants.selectors.plans import plan_list_self_serve
from tenants.selectors.tenants import (
    membership_get,
    memberships_of_user,
    plan_list,
    tenant_limits_get,
)
from tenants.selectors.usage import usage_today_for_tenant
from tenants.services.content_logging import content_logging_update
from tenants.services.organisations import (
    organisation_create,
    organisation_delete,
    organisation_plan_change,
    organisation_rename,
)
from tenants.services.quotas import quota_status
from tenants.services.spend import spend_limit_set, spend_this_month
from webplatform.dashboard.access import (
    CURRENT_TENANT_SESSION_KEY,
    OrgRequest,
    SignedInRequest,
    org_view,
)
from webplatform.dashboard.forms import (
    ContentLoggingForm,
    DeleteOrganisationForm,
    OrganisationForm,
    PlanForm,
    SpendLimitForm,
)
from webplatform.dashboard.views.common import form_error, render_page


def favicon(request: HttpRequest) -> HttpResponse:
    return HttpResponsePermanentRedirect(static("dashboard/favicon.svg"))


def home(request: HttpRequest) -> HttpResponse:
    """The current organisation's overview; the landing page for visitors (what the product
    does, example questions, sign-up, log-in and the API docs), create for the homeless."""
    if not request.user.is_authenticated:
        return render_page(request, "landing.html", {"api_base": request.build_absolute_uri("/v1")})
    current = request.session.get(CURRENT_TENANT_SESSION_KEY)
    if current and membership_get(tenant_id=current, user=request.user):
        return redirect("dashboard:overview", current)
    first = memberships_of_user(user=request.user).first()
    if first is None:
        return redirect("dashboard:org-create")
    return redirect("dashboard:overview", first.tenant_id)


@login_required
def org_create(request: SignedInRequest) -> HttpResponse:
    form = OrganisationForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            tenant = organisation_create(name=form.cleaned_data["name"], owner=request.user)
        except ApplicationError as error:
            form_error(form, error)
        else:
            messages.success(request, _("Organisation created."))
            return redirect("dashboard:overview", tenant.pk)
    return render_page(request, "dashboard/org_create.html", {"form": form})


@login_required
@require_POST
def org_switch(request: HttpRequest) -> HttpResponse:
    tenant_id = request.POST.get("tenant_id", "")
    if (
        not tenant_id.isdigit()
        or membership_get(tenant_id=int(tenant_id), user=request.user) is None
    ):
        raise Http404("No such organisation.")
    request.session[CURRENT_TENANT_SESSION_KEY] = int(tenant_id)
    return redirect("dashboard:overview", int(tenant_id))


def quota_rows(request: OrgRequest) -> list[dict[str, object]]:
    """Each quota against its limit, as the overview and usage pages show it."""
    tenant = request.tenant
    limits = tenant_limits_get(tenant=tenant)
    status = quota_status(tenant_id=tenant.pk, limits=limits)

    def row(label: str, used: int, limit: int, reset_ms: int | None) -> dict[str, object]:
        return {
            "label": label,
            "used": used,
            "limit": limit,
            "percent": min(100, round(100 * used / limit)) if limit else 0,
            "reset_ms": reset_ms or None,
        }

    return [
        row(
            _("Requests per minute"),
            status.limit_requests - status.remaining_requests,
            status.limit_requests,
            status.reset_requests_ms,
        ),
        row(
            _("Tokens per day"),
            status.limit_tokens - status.remaining_tokens,
            status.limit_tokens,
            status.reset_tokens_ms,
        ),
        row(_("Concurrent requests"), status.in_flight, status.limit_concurrent, None),
    ]


@org_view()
def overview(request: OrgRequest) -> HttpResponse:
    tenant = request.tenant
    return render_page(
        request,
        "dashboard/overview.html",
        {
            "quota_rows": quota_rows(request),
            "limits": tenant_limits_get(tenant=tenant),
            "today": usage_today_for_tenant(tenant=tenant),
            "onboarding": onboarding_for_tenant(tenant=tenant),
            "spend": spend_this_month(tenant=tenant),
        },
    )


def _settings_page(
    request: OrgRequest,
    *,
    plan_form: PlanForm | None = None,
    content_form: ContentLoggingForm | None = None,
    name_form: OrganisationForm | None = None,
    spend_form: SpendLimitForm | None = None,
    status: int = 200,
) -> HttpResponse:
    tenant = request.tenant
    plans = plan_list()
    return render_page(
        request,
        "dashboard/settings.html",
        {
            "plan_form": plan_form
            or PlanForm(plans=plan_list_self_serve(), initial={"plan": tenant.plan}),
            "plans": plans,
            "name_form": name_form or OrganisationForm(initial={"name": tenant.name}),
            "spend_form": spend_form
            or SpendLimitForm(initial={"limit": tenant.monthly_spend_limit}),
            "spend": spend_this_month(tenant=tenant),
            "content_form": content_form
            or ContentLoggingForm(
                initial={
                    "enabled": tenant.log_content,
                    "retention_days": content_retention_days_get(tenant=tenant),
                }
            ),
        },
        status=status,
    )


@org_view(Membership.Role.ADMIN)
def org_settings(request: OrgRequest) -> HttpResponse:
    return _settings_page(request)


@org_view(Membership.Role.OWNER)
@require_POST
def plan_change(request: OrgRequest) -> HttpResponse:
    """Owner only, self-serve plans only, in two steps: the first post shows what changes
    (the confirmation page), the second (``confirm``) switches."""
    form = PlanForm(request.POST, plans=plan_list_self_serve())
    if not form.is_valid():
        return _settings_page(request, plan_form=form, status=400)
    plan = form.cleaned_data["plan"]
    if plan.pk == request.tenant.plan_id:
        messages.info(request, _("This is already your plan."))
        return redirect("dashboard:settings", request.tenant.pk)
    if request.POST.get("confirm") != "yes":
        return render_page(
            request,
            "dashboard/plan_confirm.html",
            {"current": request.tenant.plan, "new": plan},
        )
    try:
        organisation_plan_change(tenant=request.tenant, plan=plan, actor=request.user)
    except ApplicationError as error:
        form_error(form, error)
        return _settings_page(request, plan_form=form, status=error.status)
    messages.success(request, _("Plan changed to %(plan)s.") % {"plan": _(plan.name)})
    return redirect("dashboard:settings", request.tenant.pk)


@org_view(Membership.Role.OWNER)
@require_POST
def spend_limit(request: OrgRequest) -> HttpResponse:
    form = SpendLimitForm(request.POST)
    if not form.is_valid():
        return _settings_page(request, spend_form=form, status=400)
    spend_limit_set(tenant=request.tenant, limit=form.cleaned_data["limit"], actor=request.user)
    messages.success(request, _("Monthly spend limit saved."))
    return redirect("dashboard:settings", request.tenant.pk)


@org_view(Membership.Role.ADMIN)
@require_POST
def org_rename(request: OrgRequest) -> HttpResponse:
    form = OrganisationForm(request.POST)
    if not form.is_valid():
        return _settings_page(request, name_form=form, status=400)
    organisation_rename(tenant=request.tenant, name=form.cleaned_data["name"], actor=request.user)
    messages.success(request, _("Organisation renamed."))
    return redirect("dashboard:settings", request.tenant.pk)


@org_view(Membership.Role.ADMIN)
@require_POST
def content_logging(request: OrgRequest) -> HttpResponse:
    form = ContentLoggingForm(request.POST)
    if not form.is_valid():
        return _settings_page(request, content_form=form, status=400)
    content_logging_update(
        tenant=request.tenant,
        enabled=form.cleaned_data["enabled"],
        retention_days=form.cleaned_data["retention_days"],
        actor=request.user,
    )
    messages.success(request, _("Content logging saved."))
    return redirect("dashboard:settings", request.tenant.pk)


@org_view(Membership.Role.OWNER)
def org_delete(request: OrgRequest) -> HttpResponse:
    tenant = request.tenant
    form = DeleteOrganisationForm(request.POST or None, expected_name=tenant.name)
    if request.method == "POST" and form.is_valid():
        organisation_delete(tenant=tenant, actor=request.user)
        request.session.pop(CURRENT_TENANT_SESSION_KEY, None)
        messages.success(
            request, _("The organisation %(name)s was deleted.") % {"name": tenant.name}
        )
        return redirect("dashboard:home")
    return render_page(request, "dashboard/org_delete.html", {"form": form})
