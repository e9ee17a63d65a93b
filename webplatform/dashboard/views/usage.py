"""Usage charts and CSV export, request log, audit log."""

from __future__ import annotations

import csv
from typing import Any

from django.contrib import messages
from django.core.paginator import Page, Paginator
from django.db.models import QuerySet
from django.http import Http404, HttpResponse
from django.shortcuts import redirect
from django.utils import timezone
from django.utils.translation import gettext as _

from tenants.models import Membership, UsageRecord
from tenants.selectors.api_keys import api_key_list_for_tenant
from tenants.selectors.audit_log import audit_log_query
from tenants.selectors.content_logging import content_log_by_request
from tenants.selectors.usage import (
    NO_KEY,
    UsageFilter,
    request_log_for_tenant,
    usage_daily_series,
    usage_models_for_tenant,
    usage_record_get_for_tenant,
)
from tenants.selectors.usage_models import usage_by_model_for_tenant
from tenants.services.members import role_at_least
from tenants.services.spend import tokens_cost
from webplatform.dashboard.access import OrgRequest, org_view
from webplatform.dashboard.forms import DateRangeForm, UsageFilterForm
from webplatform.dashboard.views.common import render_page
from webplatform.dashboard.views.organisations import quota_rows

DAYS = 30
PAGE_SIZE = 50


def paged(request: OrgRequest, rows: QuerySet[Any]) -> dict[str, Any]:
    """One page of ``rows`` (``?page=``) and what the pager and its notice need: the other
    query parameters, kept on the pager's links."""
    page: Page[Any] = Paginator(rows, PAGE_SIZE).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    return {"page_obj": page, "page_query": query.urlencode()}


def _filter_form(request: OrgRequest) -> tuple[UsageFilterForm, UsageFilter]:
    tenant = request.tenant
    keys = [
        (k.public_id, f"{k.name} ({k.public_id})") for k in api_key_list_for_tenant(tenant=tenant)
    ]
    keys.append((NO_KEY, _("Playground (no key)")))
    form = UsageFilterForm(
        request.GET or None, keys=keys, models=usage_models_for_tenant(tenant=tenant)
    )
    if form.is_bound and form.is_valid():
        return form, UsageFilter(
            api_key=form.cleaned_data["key"] or None, model=form.cleaned_data["model"] or None
        )
    return form, UsageFilter()


@org_view()
def usage(request: OrgRequest) -> HttpResponse:
    form, usage_filter = _filter_form(request)
    series = usage_daily_series(
        tenant=request.tenant,
        usage_filter=usage_filter,
        days=DAYS,
    )
    chart = {
        "labels": [d.day.isoformat() for d in series],
        "requests": [d.requests for d in series],
        "errors": [d.errors for d in series],
        "prompt_tokens": [d.prompt_tokens for d in series],
        "completion_tokens": [d.completion_tokens for d in series],
        "p50": [
            round(d.latency_p50_ms, 1) if d.latency_p50_ms is not None else None for d in series
        ],
        "p95": [
            round(d.latency_p95_ms, 1) if d.latency_p95_ms is not None else None for d in series
        ],
        "i18n": {
            "requests": _("Requests"),
            "errors": _("Errors"),
            "prompt_tokens": _("Prompt tokens"),
            "completion_tokens": _("Completion tokens"),
            "p50": _("p50 latency (ms)"),
            "p95": _("p95 latency (ms)"),
        },
    }
    totals = {
        "requests": sum(d.requests for d in series),
        "errors": sum(d.errors for d in series),
        "tokens": sum(d.total_tokens for d in series),
    }
    return render_page(
        request,
        "dashboard/usage.html",
        {
            "filter_form": form,
            "chart": chart,
            "totals": totals,
            "quota_rows": quota_rows(request),
            "query": request.GET.urlencode(),
            "days": DAYS,
            "by_model": usage_by_model_for_tenant(
                tenant=request.tenant, usage_filter=usage_filter, days=DAYS
            ),
        },
    )


@org_view()
def usage_csv(request: OrgRequest) -> HttpResponse:
    tenant = request.tenant
    _form, usage_filter = _filter_form(request)
    series = usage_daily_series(tenant=tenant, usage_filter=usage_filter, days=DAYS)
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    stamp = timezone.now().strftime("%Y%m%d")
    response["Content-Disposition"] = f'attachment; filename="usage-{tenant.slug}-{stamp}.csv"'
    writer = csv.writer(response)
    writer.writerow(
        [
            "day",
            "requests",
            "errors",
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "latency_p50_ms",
            "latency_p95_ms",
            "api_key",
            "model",
        ]
    )
    for d in series:
        writer.writerow(
            [
                d.day.isoformat(),
                d.requests,
                d.errors,
                d.prompt_tokens,
                d.completion_tokens,
                d.total_tokens,
                "" if d.latency_p50_ms is None else round(d.latency_p50_ms, 1),
                "" if d.latency_p95_ms is None else round(d.latency_p95_ms, 1),
                usage_filter.api_key or "",
                usage_filter.model or "",
            ]
        )
    return response


def _show_content(request: OrgRequest) -> bool:
    """Stored prompts and answers are for admins only, and only while logging is on."""
    return request.tenant.log_content and role_at_least(
        request.membership.role, Membership.Role.ADMIN
    )


@org_view()
def request_log(request: OrgRequest) -> HttpResponse:
    tenant = request.tenant
    # Search by request id (the x-request-id of every API response): straight to its page.
    wanted = request.GET.get("request_id", "").strip()
    if wanted:
        if usage_record_get_for_tenant(tenant=tenant, request_id=wanted) is not None:
            return redirect("dashboard:request-detail", tenant.pk, wanted)
        messages.error(request, _("No request with the id %(id)s.") % {"id": wanted[:80]})
    form, usage_filter = _filter_form(request)
    dates = DateRangeForm(request.GET or None)
    since, before = dates.bounds()
    status = request.GET.get("status")
    pager = paged(
        request,
        request_log_for_tenant(
            tenant=tenant,
            usage_filter=usage_filter,
            status=status if status in UsageRecord.Status.values else None,
            since=since,
            before=before,
        ),
    )
    records = list(pager["page_obj"])
    show_content = _show_content(request)
    content = (
        content_log_by_request(tenant=tenant, request_ids=[r.request_id for r in records])
        if show_content
        else {}
    )
    plan = tenant.plan
    rows = [
        {
            "record": r,
            "content": content.get(r.request_id),
            "cost": tokens_cost(tokens=r.prompt_tokens + r.completion_tokens, plan=plan),
        }
        for r in records
    ]
    return render_page(
        request,
        "dashboard/requests.html",
        {
            "filter_form": form,
            "date_form": dates,
            "rows": rows,
            "show_content": show_content,
            **pager,
        },
    )


@org_view()
def request_detail(request: OrgRequest, request_id: str) -> HttpResponse:
    record = usage_record_get_for_tenant(tenant=request.tenant, request_id=request_id)
    if record is None:
        raise Http404("No such request.")
    content = (
        content_log_by_request(tenant=request.tenant, request_ids=[record.request_id]).get(
            record.request_id
        )
        if _show_content(request)
        else None
    )
    return render_page(
        request,
        "dashboard/request_detail.html",
        {
            "r": record,
            "content": content,
            "show_content": _show_content(request),
            "cost": tokens_cost(
                tokens=record.prompt_tokens + record.completion_tokens, plan=request.tenant.plan
            ),
        },
    )


@org_view(Membership.Role.ADMIN)
def audit_log(request: OrgRequest) -> HttpResponse:
    dates = DateRangeForm(request.GET or None)
    since, before = dates.bounds()
    pager = paged(request, audit_log_query(tenant=request.tenant, since=since, before=before))
    return render_page(
        request,
        "dashboard/audit.html",
        {"entries": list(pager["page_obj"]), "date_form": dates, **pager},
    )
