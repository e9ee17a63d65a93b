"""What every dashboard page shows around its content: organisation switcher and menu."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from tenants.errors import ApplicationError
from tenants.models import Membership
from tenants.selectors.tenants import memberships_of_user
from tenants.services.members import role_at_least


def render_page(
    request: HttpRequest,
    template: str,
    context: dict[str, Any] | None = None,
    *,
    status: int = 200,
) -> HttpResponse:
    # Set on an organisation's pages (``org_view``); absent on the others.
    membership: Membership | None = getattr(request, "membership", None)
    role = membership.role if membership else None
    page = {
        "tenant": getattr(request, "tenant", None),
        "membership": membership,
        "is_admin": role is not None and role_at_least(role, Membership.Role.ADMIN),
        "is_owner": role == Membership.Role.OWNER,
        "my_memberships": (
            list(memberships_of_user(user=request.user)) if request.user.is_authenticated else []
        ),
    }
    return render(request, template, {**page, **(context or {})}, status=status)


def form_error(form: Any, error: ApplicationError) -> None:
    """Show a service's refusal on the form, on its field when the error names one."""
    field = error.param if error.param in getattr(form, "fields", {}) else None
    form.add_error(field, error.message)


def client_ip(request: HttpRequest) -> str:
    # REMOTE_ADDR only: X-Forwarded-For is the client's to forge unless a trusted proxy
    # rewrites it, and the ASGI server already puts the proxy's view in REMOTE_ADDR when
    # run with --proxy-headers behind one.
    return request.META.get("REMOTE_ADDR") or "unknown"
